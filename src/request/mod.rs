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
pub(crate) use walk::Key as JsonKey;

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
    /// The choices (`n`) it asks for: images an images request makes.
    pub choices: u64,
    /// Where the body names its model, for a node that calls it otherwise.
    pub model_in_body: ModelInBody,
    /// Whether it bounds its answer's length.
    pub completion_cap: CompletionCap,
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
    /// The model is a nested object's (`session.model`): the body is sent
    /// as it is.
    Nested,
}

/// Whether a request bounds its answer's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionCap {
    /// `max_completion_tokens`, `max_tokens` or `max_output_tokens` holds a
    /// number.
    Given,
    /// None of them is named.
    Absent,
    /// One is named, but not as a number (`null`, a string): the
    /// upstream's reading of it is not the gateway's.
    Unreadable,
}

/// Completion tokens reserved for a request that names no `max_tokens`:
/// `accounting.default_completion_tokens`, over it a per-model value.
#[derive(Debug, Clone, Default)]
pub struct CompletionDefaults {
    pub tokens: u64,
    pub by_model: std::collections::BTreeMap<String, u64>,
}

impl CompletionDefaults {
    pub(crate) fn for_model(&self, model: &str) -> u64 {
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
        return Ok(RequestInfo::unread(path_model, json, bytes));
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
    let mut model = match path_model {
        Some(model) => Some(Cow::Borrowed(model)),
        None => parsed.model.take().filter(|m| !m.is_empty()),
    };
    if model.is_none()
        && let Some(session) = parsed.session_model.take().filter(|m| !m.is_empty())
    {
        model = Some(session);
        parsed.model_in_body = ModelInBody::Nested;
    }
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
    // Background work is done later, outside the per-minute limits: it
    // counts as a request, and no tokens (see the README).
    let background = parsed.background && path == "/responses";
    let prompt_tokens = if background { 0 } else { prompt_tokens };
    let (completion_tokens, open_ended) = match model.as_deref() {
        None => (0, None),
        _ if background || path == "/embeddings" => (0, None),
        Some(model) => completion(&parsed, prompt_tokens, defaults.for_model(model)),
    };
    Ok(RequestInfo {
        choices: parsed.choices.unwrap_or(1).clamp(1, MAX_CHOICES),
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
            usable: crate::limits::share::WHOLE,
        },
        model_in_body: parsed.model_in_body,
        completion_cap: match (parsed.max_tokens, parsed.max_tokens_named) {
            (Some(_), _) => CompletionCap::Given,
            (None, false) => CompletionCap::Absent,
            (None, true) => CompletionCap::Unreadable,
        },
        model: model.map(|m| m.into_owned().into_boxed_str()),
    })
}

/// The most choices a request is taken to ask for.
const MAX_CHOICES: u64 = 128;

/// The completion a request reserves (its `max_tokens`, else `default`,
/// times its choices), and for an open-ended one, its prompt and choices.
fn completion(parsed: &Parsed<'_>, prompt_tokens: u64, default: u64) -> (u64, Option<(u64, u64)>) {
    let choices = parsed.choices.unwrap_or(1).clamp(1, MAX_CHOICES);
    match parsed.max_tokens {
        Some(max) => (max.saturating_mul(choices), None),
        None => (
            default.saturating_mul(choices),
            Some((prompt_tokens, choices)),
        ),
    }
}

impl RequestInfo {
    /// A body not read as JSON (an upload, a binary body) or an empty one:
    /// one request and its bytes.
    fn unread(path_model: Option<&str>, json: bool, bytes: u64) -> Self {
        RequestInfo {
            model: path_model.map(Box::from),
            stream: false,
            store: None,
            background: false,
            encoding: Encoding::Cl100kBase,
            prompt_tokens: 0,
            choices: 1,
            demand: Demand {
                tokens: 0,
                bytes,
                open_ended: None,
                usable: crate::limits::share::WHOLE,
            },
            model_in_body: if json {
                ModelInBody::Absent
            } else {
                ModelInBody::NotJson
            },
            completion_cap: CompletionCap::Absent,
        }
    }
}

/// Whether a request path may be forwarded: no segment that is `.` or
/// `..` (also percent-encoded, in any case), and no encoded `/` or `\`
/// (nor a raw `\`), any of which could make the upstream's path escape
/// `/v1` (a URL parser resolves dot segments) and reach another of its
/// routes with the node's key.
pub fn check_path(path: &str) -> Result<(), GatewayError> {
    let bytes = path.as_bytes();
    // `%2f` / `%5c` in any case: an encoded `/` or `\`.
    let encoded_slash = bytes
        .windows(3)
        .any(|w| w[0] == b'%' && matches!((w[1], w[2] | 0x20), (b'2', b'f') | (b'5', b'c')));
    // `%00`-`%1f` and `%7f`: a control character, which no API path holds
    // and some upstreams' routers cut the path at.
    let encoded_control = bytes.windows(3).any(|w| {
        w[0] == b'%'
            && (matches!(w[1], b'0' | b'1') && w[2].is_ascii_hexdigit()
                || w[1] == b'7' && (w[2] | 0x20) == b'f')
    });
    if encoded_slash
        || encoded_control
        || bytes.contains(&b'\\')
        || path.split('/').any(is_dot_segment)
    {
        return Err(GatewayError::InvalidPath);
    }
    Ok(())
}

/// Whether `segment` is `.` or `..`, each dot literal or `%2e` in any case.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if *e | 0x20 == b'e' => tail,
            _ => return false,
        };
        dots += 1;
    }
    dots == 1 || dots == 2
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
    /// Whether any of those three keys is present, readable or not.
    max_tokens_named: bool,
    /// `session.model` (a realtime session's).
    session_model: Option<Cow<'a, str>>,
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
            max_tokens_named: false,
            session_model: None,
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
mod tests;
