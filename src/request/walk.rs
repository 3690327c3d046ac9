//! The body's visitors: they walk the JSON once, keep the few fields the
//! gateway reads and the prompt's text (borrowed from the body where JSON
//! allows), and skip everything else without building it.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use serde_json::value::RawValue;

use super::{ModelInBody, Parsed, Texts};
use crate::tokens::{REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TOKENS_PER_NAME};

/// The top-level object: the fields that matter, everything else skipped.
pub(super) struct BodySeed<'p, 'a>(pub(super) &'p mut Parsed<'a>);

impl<'de> DeserializeSeed<'de> for BodySeed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let parsed = self.0;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let shape = match &*key {
                "model" => {
                    let model = map.next_value::<Loose<Cow<'de, str>>>()?.0;
                    parsed.model_in_body = match &model {
                        Some(Cow::Borrowed(text)) => {
                            let start = (text.as_ptr() as usize).saturating_sub(parsed.body_start);
                            ModelInBody::At(start..start + text.len())
                        }
                        _ => ModelInBody::Escaped,
                    };
                    parsed.model = model;
                    continue;
                }
                "n" | "best_of" => {
                    let asked = map.next_value::<Loose<u64>>()?.0;
                    parsed.choices = parsed.choices.max(asked);
                    continue;
                }
                // Definitions and schemas are part of the prompt: their JSON
                // text is counted, as written.
                "tools" | "functions" | "response_format" => {
                    let raw = map.next_value::<&'de RawValue>()?;
                    parsed.texts.push(Cow::Borrowed(raw.get()));
                    continue;
                }
                "stream" => {
                    parsed.stream = map.next_value::<Loose<bool>>()?.0 == Some(true);
                    continue;
                }
                "store" => {
                    parsed.store = map.next_value::<Loose<bool>>()?.0;
                    continue;
                }
                "background" => {
                    parsed.background = map.next_value::<Loose<bool>>()?.0 == Some(true);
                    continue;
                }
                "session" => {
                    // A realtime session's model (`client_secrets`,
                    // `sessions`): the model the request really asks for.
                    parsed.session_model = map.next_value::<SessionModel<'de>>()?.0;
                    continue;
                }
                "max_completion_tokens" | "max_tokens" | "max_output_tokens" => {
                    parsed.max_tokens_named = true;
                    let rank = match &*key {
                        "max_completion_tokens" => 1,
                        "max_tokens" => 2,
                        _ => 3,
                    };
                    let value = map.next_value::<Loose<u64>>()?.0;
                    let better = parsed.max_tokens.is_none() || rank < parsed.max_tokens_rank;
                    if value.is_some() && better {
                        parsed.max_tokens = value;
                        parsed.max_tokens_rank = rank;
                    }
                    continue;
                }
                "messages" => Shape::Messages,
                "prompt" | "input" | "instructions" => Shape::Content,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            map.next_value_seed(Walk {
                texts: &mut parsed.texts,
                shape,
            })?;
        }
        Ok(())
    }

    // Any other JSON value is valid JSON with nothing in it for us.
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// What a prompt-bearing value is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A chat's `messages`: a list of messages, plus the reply's priming;
    /// anything else is skipped.
    Messages,
    /// One element of `messages`: a message object, else skipped.
    Message,
    /// Content in any of its shapes: a string, a list (of strings, token
    /// ids, lists of token ids, content parts or messages), or one part or
    /// message. Token ids count one each.
    Content,
}

/// Walks a prompt-bearing value of the expected [`Shape`], its text going
/// to the [`Texts`].
struct Walk<'t, 'a> {
    texts: &'t mut Texts<'a>,
    shape: Shape,
}

impl<'de> DeserializeSeed<'de> for Walk<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Walk<'_, 'de> {
    fn text(self, text: Cow<'de, str>) {
        if self.shape == Shape::Content {
            self.texts.push(text);
        }
    }
}

impl<'de> Visitor<'de> for Walk<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<(), E> {
        self.text(Cow::Borrowed(v));
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.text(Cow::Owned(v.to_owned()));
        Ok(())
    }
    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.text(Cow::Owned(v));
        Ok(())
    }
    /// A token id.
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        if self.shape == Shape::Content {
            self.texts.add(1);
        }
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        let element = match self.shape {
            Shape::Messages => {
                self.texts.add(REPLY_PRIMING_TOKENS);
                Shape::Message
            }
            Shape::Content => Shape::Content,
            Shape::Message => {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(());
            }
        };
        let texts = self.texts;
        while seq
            .next_element_seed(Walk {
                texts: &mut *texts,
                shape: element,
            })?
            .is_some()
        {}
        Ok(())
    }

    /// A message (`role`, `content`, `name`) or a content part (`text`).
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        if self.shape == Shape::Messages {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        }
        let texts = self.texts;
        let mut item = Item::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match &*key {
                "role" => item.role = map.next_value::<Loose<Cow<'de, str>>>()?.0,
                "name" => item.name = map.next_value::<Loose<Cow<'de, str>>>()?.0,
                // A part's text; a tool call's arguments; a tool's output.
                "text" | "arguments" | "output" => {
                    if let Some(text) = map.next_value::<Loose<Cow<'de, str>>>()?.0 {
                        item.texts.push(text);
                    }
                }
                "type" => item.kind = map.next_value::<Loose<Cow<'de, str>>>()?.0,
                "detail" => item.detail = map.next_value::<Loose<Cow<'de, str>>>()?.0,
                "image_url" => {
                    item.image = true;
                    if let Some(detail) = map.next_value::<ImageUrl<'de>>()?.detail {
                        item.detail = Some(detail);
                    }
                }
                "input_audio" => item.audio_base64 = map.next_value::<AudioData>()?.0,
                "content" => {
                    item.content = true;
                    map.next_value_seed(Walk {
                        texts: &mut *texts,
                        shape: Shape::Content,
                    })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        item.count(texts);
        Ok(())
    }
}

/// What one object in a prompt (a message, a content part, an input item)
/// holds, counted when its end is read.
#[derive(Default)]
struct Item<'a> {
    role: Option<Cow<'a, str>>,
    name: Option<Cow<'a, str>>,
    kind: Option<Cow<'a, str>>,
    detail: Option<Cow<'a, str>>,
    texts: Vec<Cow<'a, str>>,
    content: bool,
    image: bool,
    audio_base64: u64,
}

impl<'a> Item<'a> {
    fn count(self, texts: &mut Texts<'a>) {
        if self.role.is_some() || self.content {
            texts.add(TOKENS_PER_MESSAGE);
        }
        if let Some(name) = self.name {
            texts.add(TOKENS_PER_NAME);
            texts.push(name);
        }
        let image = self.image || matches!(self.kind.as_deref(), Some("input_image" | "image_url"));
        if image {
            if self.detail.as_deref() == Some("low") {
                texts.media.low_images += 1;
            } else {
                texts.media.images += 1;
            }
        }
        texts.media.audio_base64 = texts.media.audio_base64.saturating_add(self.audio_base64);
        for piece in self.role.into_iter().chain(self.texts) {
            texts.push(piece);
        }
    }
}

/// An `image_url`: a URL (often a large data URL, walked, not kept) or an
/// object with `url` and `detail`.
struct ImageUrl<'a> {
    detail: Option<Cow<'a, str>>,
}

impl<'de> serde::Deserialize<'de> for ImageUrl<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Reader;
        impl<'de> Visitor<'de> for Reader {
            type Value = ImageUrl<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an image URL")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut detail = None;
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if &*key == "detail" {
                        detail = map.next_value::<Loose<Cow<'de, str>>>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ImageUrl { detail })
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(ImageUrl { detail: None })
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ImageUrl { detail: None })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ImageUrl { detail: None })
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ImageUrl { detail: None })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ImageUrl { detail: None })
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ImageUrl { detail: None })
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(ImageUrl { detail: None })
            }
        }
        deserializer.deserialize_any(Reader)
    }
}

/// `input_audio`: the length of its base64 `data`, walked, not kept.
struct AudioData(u64);

impl<'de> serde::Deserialize<'de> for AudioData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Reader;
        impl<'de> Visitor<'de> for Reader {
            type Value = AudioData;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("input audio")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<AudioData, M::Error> {
                let mut length = 0;
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if &*key == "data" {
                        length = map
                            .next_value::<Loose<Cow<'de, str>>>()?
                            .0
                            .map_or(0, |d| d.len() as u64);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(AudioData(length))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<AudioData, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(AudioData(0))
            }
            fn visit_str<E>(self, _: &str) -> Result<AudioData, E> {
                Ok(AudioData(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<AudioData, E> {
                Ok(AudioData(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<AudioData, E> {
                Ok(AudioData(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<AudioData, E> {
                Ok(AudioData(0))
            }
            fn visit_bool<E>(self, _: bool) -> Result<AudioData, E> {
                Ok(AudioData(0))
            }
            fn visit_unit<E>(self) -> Result<AudioData, E> {
                Ok(AudioData(0))
            }
        }
        deserializer.deserialize_any(Reader)
    }
}

/// A JSON value as far as a scalar field cares: strings, booleans and
/// non-negative integers are kept; anything else is skipped unbuilt.
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    U64(u64),
    Other,
}

/// An object's key, borrowed from the body unless it has escapes (serde's
/// own `Cow<str>` always copies).
pub(crate) struct Key<'de>(Cow<'de, str>);

impl std::ops::Deref for Key<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// An object's `model` (a string), anything else skipped.
struct SessionModel<'de>(Option<Cow<'de, str>>);

impl<'de> serde::Deserialize<'de> for SessionModel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ModelVisitor;
        impl<'de> Visitor<'de> for ModelVisitor {
            type Value = SessionModel<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a session object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut model = None;
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if &*key == "model" {
                        model = map.next_value::<Loose<Cow<'de, str>>>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(SessionModel(model))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(SessionModel(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(SessionModel(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(SessionModel(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(SessionModel(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(SessionModel(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(SessionModel(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(SessionModel(None))
            }
        }
        deserializer.deserialize_any(ModelVisitor)
    }
}

/// A field used when it has the expected type, skipped otherwise.
struct Loose<T>(Option<T>);

impl<'de, T: FromScalar<'de>> serde::Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Loose(T::from_scalar(
            deserializer.deserialize_any(ScalarVisitor)?,
        )))
    }
}

/// The scalar types a [`Loose`] field may hold.
trait FromScalar<'a>: Sized {
    fn from_scalar(scalar: Scalar<'a>) -> Option<Self>;
}

impl<'a> FromScalar<'a> for Cow<'a, str> {
    fn from_scalar(scalar: Scalar<'a>) -> Option<Self> {
        match scalar {
            Scalar::Str(text) => Some(text),
            _ => None,
        }
    }
}

impl FromScalar<'_> for bool {
    fn from_scalar(scalar: Scalar<'_>) -> Option<Self> {
        match scalar {
            Scalar::Bool(value) => Some(value),
            _ => None,
        }
    }
}

impl FromScalar<'_> for u64 {
    fn from_scalar(scalar: Scalar<'_>) -> Option<Self> {
        match scalar {
            Scalar::U64(value) => Some(value),
            _ => None,
        }
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::U64(v))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}
