//! What an answer says about the tokens it used: the `usage` object of a
//! JSON answer or of a stream's final event, or else the streamed text
//! counted with the model's tokenizer.
//!
//! Both dialects are read: Chat and Completions (`prompt_tokens`,
//! `completion_tokens`; text in `choices[].delta.content`, `.text` and tool
//! call arguments) and the Responses API (`input_tokens`, `output_tokens`,
//! under `response` in its `response.completed`, `response.incomplete` and
//! `response.failed` events; text in its `*.delta` events for output text,
//! refusals, reasoning and its summaries, and function call arguments). (The rate windows are
//! [`crate::limits`]'; what clients used over time is [`crate::ledger`]'s.)

use std::borrow::Cow;

use serde::Deserialize;

use crate::tokens::Encoding;

/// A JSON answer longer than this is relayed without reading its usage (the
/// reservation then stays counted in full). Chat answers are far smaller.
const MAX_JSON_USAGE_BYTES: usize = 4 * 1024 * 1024;

/// What a response says about the tokens it used.
#[derive(Debug)]
pub(crate) enum Meter {
    /// A JSON answer, kept (up to a bound) to read its `usage` at the end.
    Json(Vec<u8>),
    Sse(SseMeter),
    /// Neither JSON nor a stream: nothing to read.
    Opaque,
}

impl Meter {
    pub(crate) fn observe(&mut self, chunk: &[u8]) {
        match self {
            Meter::Json(body) => {
                if body.len() + chunk.len() <= MAX_JSON_USAGE_BYTES {
                    body.extend_from_slice(chunk);
                } else {
                    *self = Meter::Opaque;
                }
            }
            Meter::Sse(sse) => sse.observe(chunk),
            Meter::Opaque => {}
        }
    }

    /// The tokens the request used, if known: the answer's own `usage`, or
    /// else the prompt as counted here and the streamed text. A failed
    /// answer used its prompt only.
    pub(crate) fn usage(
        &self,
        prompt_tokens: u64,
        encoding: Encoding,
        success: bool,
    ) -> Option<TokenUsage> {
        let prompt_only = TokenUsage::prompt_only(prompt_tokens);
        match self {
            Meter::Json(body) => serde_json::from_slice::<WithUsage>(body)
                .ok()
                .and_then(|w| {
                    let images = w.data.map_or(0, |d| d.len() as u64);
                    // A transcription's seconds: its usage, else the
                    // `duration` of a verbose answer.
                    let audio_ms = w
                        .usage
                        .and_then(|u| u.seconds)
                        .or(w.duration)
                        .map_or(0, seconds_to_ms);
                    match w.usage {
                        Some(u) => Some(TokenUsage {
                            images,
                            audio_ms,
                            ..u.split(prompt_tokens)
                        }),
                        // An images or audio answer without usage.
                        None if (images > 0 || audio_ms > 0) && success => Some(TokenUsage {
                            images,
                            audio_ms,
                            ..TokenUsage::prompt_only(0)
                        }),
                        None => None,
                    }
                })
                .or((!success).then_some(prompt_only)),
            Meter::Sse(sse) => Some(sse.usage.map_or_else(
                || TokenUsage {
                    completion: sse.streamed_tokens(encoding),
                    ..prompt_only
                },
                |u| u.split(prompt_tokens),
            )),
            Meter::Opaque => (!success).then_some(prompt_only),
        }
    }

    /// The id of the object a stream creates, the first time it is seen
    /// (then `None` again).
    pub(crate) fn take_created(&mut self) -> Option<String> {
        match self {
            Meter::Sse(sse) if !sse.created_taken => {
                let id = sse.created.clone()?;
                sse.created_taken = true;
                Some(id)
            }
            _ => None,
        }
    }

    /// Total tokens (prompt + completion) the request used, if known.
    #[cfg(test)]
    pub(crate) fn tokens(
        &self,
        prompt_tokens: u64,
        encoding: Encoding,
        success: bool,
    ) -> Option<u64> {
        self.usage(prompt_tokens, encoding, success)
            .map(TokenUsage::total)
    }
}

/// Prompt and completion tokens of one request, and what else is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenUsage {
    pub prompt: u64,
    /// Completion tokens, reasoning tokens included (as every dialect
    /// reports them).
    pub completion: u64,
    /// Prompt tokens the provider served from its cache (part of `prompt`).
    pub cached_prompt: u64,
    /// Images an images answer returned.
    pub images: u64,
    /// Milliseconds of audio a transcription read.
    pub audio_ms: u64,
}

impl TokenUsage {
    /// `prompt` tokens and nothing else.
    pub(crate) fn prompt_only(prompt: u64) -> Self {
        Self {
            prompt,
            completion: 0,
            cached_prompt: 0,
            images: 0,
            audio_ms: 0,
        }
    }

    /// What is priced of it.
    pub(crate) fn priced(self) -> crate::money::Usage {
        crate::money::Usage {
            prompt: self.prompt,
            cached_prompt: self.cached_prompt,
            completion: self.completion,
            images: self.images,
            audio_ms: self.audio_ms,
        }
    }

    pub(crate) fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The longest stream line kept to be read: a streamed event is a few
/// hundred bytes; a longer line is relayed but not read (its usage, if
/// any, is lost; the streamed text still counts).
pub(crate) const MAX_SSE_LINE: usize = 1 << 20;

/// Streamed text kept to be counted exactly if no usage arrives; past it,
/// a byte counts as a token (an upper bound).
const MAX_STREAMED_TEXT: usize = crate::request::MAX_COUNTED_BYTES;

/// Follows a server-sent event stream line by line across chunk borders.
/// What it keeps is bounded: one line up to [`MAX_SSE_LINE`], text up to
/// [`MAX_STREAMED_TEXT`].
#[derive(Debug, Default)]
pub(crate) struct SseMeter {
    partial: Vec<u8>,
    /// The line in progress passed [`MAX_SSE_LINE`]: skip to its end.
    skipping: bool,
    usage: Option<Usage>,
    /// Streamed completion text, counted only if no usage arrives.
    text: String,
    /// Streamed text bytes past [`MAX_STREAMED_TEXT`].
    text_overflow: u64,
    /// The id of the object the stream creates, once seen: a Responses
    /// stream's `response.created`, a chat stream's first chunk.
    created: Option<String>,
    created_taken: bool,
    /// Whether to look for that id at all.
    watches_created: bool,
}

impl SseMeter {
    /// A meter that also notes the id of the object the stream creates.
    pub(crate) fn watching_created() -> Self {
        Self {
            watches_created: true,
            ..Self::default()
        }
    }

    fn observe(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            if std::mem::take(&mut self.skipping) {
                self.partial.clear();
            } else if self.partial.is_empty() {
                self.line(&rest[..end]);
            } else if self.partial.len() + end <= MAX_SSE_LINE {
                self.partial.extend_from_slice(&rest[..end]);
                let line = std::mem::take(&mut self.partial);
                self.line(&line);
            } else {
                self.partial.clear();
            }
            rest = &rest[end + 1..];
        }
        if self.skipping {
            return;
        }
        if self.partial.len() + rest.len() > MAX_SSE_LINE {
            self.partial = Vec::new();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    fn keep_text(&mut self, text: &str) {
        if self.text.len() + text.len() <= MAX_STREAMED_TEXT {
            self.text.push_str(text);
        } else {
            self.text_overflow = self.text_overflow.saturating_add(text.len() as u64);
        }
    }

    /// Completion tokens in the streamed text.
    fn streamed_tokens(&self, encoding: Encoding) -> u64 {
        encoding
            .count(&self.text)
            .saturating_add(self.text_overflow)
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if data.is_empty() || data == b"[DONE]" {
            return;
        }
        let Ok(event) = serde_json::from_slice::<StreamEvent<'_>>(data) else {
            return;
        };
        if self.watches_created && self.created.is_none() {
            self.created = match (event.kind.as_deref(), event.object.as_deref()) {
                (Some("response.created"), _) => event.response.as_ref().and_then(|r| r.id.clone()),
                (_, Some("chat.completion.chunk")) => event.id.as_deref().map(str::to_owned),
                _ => None,
            };
        }
        if let Some(usage) = event.usage.or_else(|| event.response.and_then(|r| r.usage)) {
            self.usage = Some(usage);
        }
        for choice in event.choices.iter().flatten() {
            if let Some(delta) = &choice.delta {
                if let Some(text) = delta.content.as_deref() {
                    self.keep_text(text);
                }
                for call in delta.tool_calls.iter().flatten() {
                    if let Some(arguments) =
                        call.function.as_ref().and_then(|f| f.arguments.as_deref())
                    {
                        self.keep_text(arguments);
                    }
                }
            }
            if let Some(text) = choice.text.as_deref() {
                self.keep_text(text);
            }
        }
        if let (Some(kind), Some(delta)) = (event.kind.as_deref(), event.delta)
            && RESPONSES_TEXT_DELTAS.contains(&kind)
            && let Ok(text) = serde_json::from_str::<Cow<'_, str>>(delta.get())
        {
            self.keep_text(&text);
        }
    }
}

/// The Responses API stream events whose string `delta` is generated text
/// (what a cut stream is settled by).
const RESPONSES_TEXT_DELTAS: [&str; 6] = [
    "response.output_text.delta",
    "response.refusal.delta",
    "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta",
    "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta",
];

/// A `usage` object in either dialect (Chat's `prompt_tokens` and
/// `completion_tokens`, Responses' `input_tokens` and `output_tokens`).
#[derive(Debug, Clone, Copy, Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    input_tokens_details: Option<PromptDetails>,
    /// A transcription billed by duration: `{"type":"duration","seconds":N}`.
    seconds: Option<f64>,
}

/// Seconds (as an answer says them) to whole milliseconds; nonsense is 0.
fn seconds_to_ms(seconds: f64) -> u64 {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).round() as u64
    } else {
        0
    }
}

/// `prompt_tokens_details` (Chat) or `input_tokens_details` (Responses).
#[derive(Debug, Clone, Copy, Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

impl Usage {
    /// Prompt and completion as the upstream reported them; a missing part
    /// is what the total leaves (the prompt as counted here if need be).
    fn split(self, counted_prompt: u64) -> TokenUsage {
        let reported_completion = self.completion_tokens.or(self.output_tokens);
        let prompt =
            self.prompt_tokens
                .or(self.input_tokens)
                .unwrap_or_else(|| match self.total_tokens {
                    Some(total) => total.saturating_sub(reported_completion.unwrap_or(0)),
                    None => counted_prompt,
                });
        let completion = reported_completion.unwrap_or_else(|| {
            self.total_tokens
                .map_or(0, |total| total.saturating_sub(prompt))
        });
        let cached_prompt = self
            .prompt_tokens_details
            .or(self.input_tokens_details)
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .min(prompt);
        TokenUsage {
            prompt,
            completion,
            cached_prompt,
            images: 0,
            audio_ms: 0,
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<Usage>,
    id: Option<String>,
    /// An images (or embeddings, or list) answer's items: counted, not kept.
    #[serde(default, deserialize_with = "count_items")]
    data: Option<Count>,
    /// A verbose transcription's length in seconds.
    duration: Option<f64>,
}

/// How many items a JSON array holds (anything else: `None`).
#[derive(Debug, Clone, Copy)]
struct Count(usize);

impl Count {
    fn len(self) -> usize {
        self.0
    }
}

fn count_items<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Count>, D::Error> {
    struct Items;
    impl<'de> serde::de::Visitor<'de> for Items {
        type Value = Option<Count>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("anything")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut n = 0;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(Some(Count(n)))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(Items)
}

#[derive(Deserialize)]
struct StreamEvent<'a> {
    usage: Option<Usage>,
    #[serde(borrow)]
    choices: Option<Vec<StreamChoice<'a>>>,
    /// A Responses event's name.
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    /// A Responses event's delta: text for the text events, other shapes
    /// for others (kept raw, read only when it is text).
    #[serde(borrow)]
    delta: Option<&'a serde_json::value::RawValue>,
    /// The response a Responses lifecycle event carries.
    response: Option<WithUsage>,
    /// A chat chunk's completion id, and what it is.
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    object: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow)]
    arguments: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENC: Encoding = Encoding::Cl100kBase;

    #[test]
    fn json_usage_is_read_at_the_end() {
        let mut meter = Meter::Json(Vec::new());
        meter.observe(br#"{"id":"x","usage":{"prompt_tokens":7,"#);
        meter.observe(br#""completion_tokens":5,"total_tokens":12}}"#);
        assert_eq!(meter.tokens(99, ENC, true), Some(12));
    }

    #[test]
    fn a_json_answer_without_usage_keeps_the_reservation_unless_it_failed() {
        let mut meter = Meter::Json(Vec::new());
        meter.observe(br#"{"error":{"message":"bad"}}"#);
        assert_eq!(meter.tokens(9, ENC, true), None);
        assert_eq!(meter.tokens(9, ENC, false), Some(9));
    }

    #[test]
    fn the_final_stream_event_usage_wins_across_chunk_borders() {
        let mut meter = Meter::Sse(SseMeter::default());
        meter.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\nda");
        meter.observe(b"ta: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n");
        meter.observe(b"data: [DONE]\n\n");
        assert_eq!(meter.tokens(100, ENC, true), Some(5));
    }

    #[test]
    fn a_stream_without_usage_counts_its_text() {
        let mut meter = Meter::Sse(SseMeter::default());
        meter.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n");
        meter.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n");
        // Cut short here: no [DONE], no usage.
        assert_eq!(meter.tokens(10, ENC, true), Some(10 + 2));
    }

    #[test]
    fn a_line_without_an_end_is_not_kept_past_its_bound() {
        let mut sse = SseMeter::default();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(MAX_SSE_LINE / chunk.len() + 4) {
            sse.observe(&chunk);
        }
        assert!(sse.partial.len() <= MAX_SSE_LINE, "{}", sse.partial.len());
        // The next line is read again.
        sse.observe(
            b"\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n",
        );
        let mut meter = Meter::Sse(sse);
        meter.observe(b"");
        assert_eq!(meter.tokens(9, ENC, true), Some(3));
    }

    fn split(meter: &Meter, counted_prompt: u64) -> (u64, u64) {
        let usage = meter.usage(counted_prompt, ENC, true).expect("usage known");
        (usage.prompt, usage.completion)
    }

    #[test]
    fn a_responses_answer_settles_at_its_input_and_output_tokens() {
        let mut meter = Meter::Json(Vec::new());
        meter.observe(br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":40,"input_tokens_details":{"cached_tokens":0},"output_tokens":300,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":340}}"#);
        assert_eq!(split(&meter, 99), (40, 300));
    }

    #[test]
    fn a_responses_stream_settles_at_the_usage_its_final_event_carries() {
        for last in [
            "response.completed",
            "response.incomplete",
            "response.failed",
        ] {
            let mut meter = Meter::Sse(SseMeter::default());
            meter.observe(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\n");
            meter.observe(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hello there\"}\n\n");
            meter.observe(format!("event: {last}\ndata: {{\"type\":\"{last}\",\"response\":{{\"id\":\"resp_1\",\"usage\":{{\"input_tokens\":40,\"output_tokens\":300,\"total_tokens\":340}}}}}}\n\n").as_bytes());
            assert_eq!(split(&meter, 99), (40, 300), "{last}");
        }
    }

    #[test]
    fn a_cut_responses_stream_counts_its_generated_text_and_nothing_else() {
        let mut meter = Meter::Sse(SseMeter::default());
        for (kind, delta) in [
            ("response.output_text.delta", "\"hello\""),
            ("response.reasoning_summary_text.delta", "\" world\""),
            ("response.function_call_arguments.delta", "\" again\""),
            // Not text: audio bytes, and an event whose delta is an object.
            ("response.audio.delta", "\"AAAAAAAAAAAAAAAAAAAA\""),
            ("response.custom.delta", "{\"text\":\"ignored\"}"),
        ] {
            meter
                .observe(format!("data: {{\"type\":\"{kind}\",\"delta\":{delta}}}\n\n").as_bytes());
        }
        // Cut: no response.completed. "hello world again" is three tokens.
        assert_eq!(split(&meter, 10), (10, 3));
    }

    #[test]
    fn a_transcription_is_read_for_its_seconds() {
        for body in [
            &br#"{"text":"hello","usage":{"type":"duration","seconds":12.5}}"#[..],
            br#"{"task":"transcribe","duration":12.5,"text":"hello","segments":[]}"#,
        ] {
            let mut meter = Meter::Json(Vec::new());
            meter.observe(body);
            let usage = meter.usage(0, ENC, true).expect("usage known");
            assert_eq!(usage.audio_ms, 12_500);
        }
    }

    #[test]
    fn a_cut_chat_stream_counts_tool_call_arguments() {
        let mut meter = Meter::Sse(SseMeter::default());
        meter.observe(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"hello\"}}]}}]}\n\n");
        meter.observe(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\" world\"}}]}}]}\n\n");
        assert_eq!(split(&meter, 10), (10, 2));
    }
}
