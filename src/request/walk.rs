//! The body's visitors: they walk the JSON once, keep the few fields the
//! gateway reads and the prompt's text (borrowed from the body where JSON
//! allows), and skip everything else without building it.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Parsed, Texts};
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
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let shape = match &*key {
                "model" => {
                    parsed.model = map.next_value::<Loose<Cow<'de, str>>>()?.0;
                    continue;
                }
                "stream" => {
                    parsed.stream = map.next_value::<Loose<bool>>()?.0 == Some(true);
                    continue;
                }
                "max_completion_tokens" | "max_tokens" | "max_output_tokens" => {
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
        let (mut role, mut name, mut text) = (None, None, None);
        let mut has_content = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "role" => role = map.next_value::<Loose<Cow<'de, str>>>()?.0,
                "name" => name = map.next_value::<Loose<Cow<'de, str>>>()?.0,
                "text" => text = map.next_value::<Loose<Cow<'de, str>>>()?.0,
                "content" => {
                    has_content = true;
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
        if role.is_some() || has_content {
            texts.add(TOKENS_PER_MESSAGE);
        }
        if let Some(name) = name {
            texts.add(TOKENS_PER_NAME);
            texts.push(name);
        }
        for piece in [role, text].into_iter().flatten() {
            texts.push(piece);
        }
        Ok(())
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
