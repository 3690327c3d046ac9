//! What a request says about stored objects: the operation its path names
//! ([`PathUse`]) and the object ids its JSON body names ([`body_ids`]).
//!
//! A body is walked for ids only if a quick byte search finds a key that
//! can hold one, or any `\u` escape (a key spelled with escapes, such as
//! `"previous_response\u005fid"`, is the same key to the upstream, so the
//! search must not be fooled by it): a chat request that names none costs
//! a few `memmem` passes. The walk compares keys as JSON decodes them,
//! builds nothing, keeps the string values of the id-bearing keys, and
//! skips `metadata` and JSON schemas (where a property may be called
//! `file_id` without naming a file).

use std::borrow::Cow;
use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Kind;
use crate::error::GatewayError;

/// What a request's path does with objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathUse<'a> {
    /// Nothing the gateway tracks.
    None,
    /// Creates an object of this kind (its answer carries the id).
    Creates(Kind),
    /// Lists the caller's objects of this kind (answered by the gateway).
    Lists(Kind),
    /// Reads the object `id` itself (`GET /v1/files/{id}`).
    Shows(Kind, &'a str),
    /// Changes or works under the object `id`.
    Uses(Kind, &'a str),
    /// Deletes the object `id` itself.
    Deletes(Kind, &'a str),
}

/// The longest id the gateway takes: far above any the API hands out.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` could be an object id: 1 to [`MAX_ID_LEN`] ASCII letters,
/// digits, `-` and `_` (the API's ids: `file-…`, `batch_…`, `resp_…`).
pub fn is_plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn checked(id: &str) -> Result<&str, GatewayError> {
    if is_plausible_id(id) {
        Ok(id)
    } else if id.is_empty() {
        Err(GatewayError::InvalidObjectId(
            "the path names an empty object id".to_owned(),
        ))
    } else {
        Err(GatewayError::InvalidObjectId(format!(
            "'{}' is not an object id (letters, digits, '-' and '_', at most {MAX_ID_LEN})",
            id.chars().take(64).collect::<String>().escape_debug()
        )))
    }
}

/// Reads `method` on `path` (below `/v1`). A path that names an object in
/// a tracked collection must name a plausible id.
pub fn path_use<'a>(method: &str, path: &'a str) -> Result<PathUse<'a>, GatewayError> {
    let path = path.trim_start_matches('/');
    let (kind, rest) = match Kind::ALL
        .iter()
        .find_map(|k| Some((*k, strip_collection(path, k.collection())?)))
    {
        Some(found) => found,
        None => return Ok(PathUse::None),
    };
    let Some(rest) = rest else {
        return Ok(match (method, kind) {
            ("POST", Kind::ChatCompletion) => PathUse::None,
            ("POST", _) => PathUse::Creates(kind),
            ("GET", k) if k.listable() => PathUse::Lists(kind),
            _ => PathUse::None,
        });
    };
    let (id, below) = rest.split_once('/').unwrap_or((rest, ""));
    // `/threads/runs` creates a thread (and its run).
    if kind == Kind::Thread && id == "runs" && below.is_empty() {
        return Ok(if method == "POST" {
            PathUse::Creates(Kind::Thread)
        } else {
            PathUse::None
        });
    }
    let id = checked(id)?;
    Ok(match (method, below.is_empty()) {
        ("DELETE", true) => PathUse::Deletes(kind, id),
        ("GET", true) => PathUse::Shows(kind, id),
        _ => PathUse::Uses(kind, id),
    })
}

/// `path` below `collection`: `None` if it is not in it, `Some(None)` for
/// the collection itself, `Some(Some(rest))` below it.
fn strip_collection<'a>(path: &'a str, collection: &str) -> Option<Option<&'a str>> {
    let rest = path.strip_prefix(collection)?;
    match rest.strip_prefix('/') {
        Some(below) => Some(Some(below)),
        None if rest.is_empty() => Some(None),
        None => None,
    }
}

/// The body keys whose string values (or arrays of strings) name objects.
const ID_KEYS: [(&str, Kind); 11] = [
    ("previous_response_id", Kind::Response),
    ("conversation", Kind::Conversation),
    ("input_file_id", Kind::File),
    ("file_id", Kind::File),
    ("file_ids", Kind::File),
    ("training_file", Kind::File),
    ("validation_file", Kind::File),
    ("vector_store_ids", Kind::VectorStore),
    ("thread_id", Kind::Thread),
    ("assistant_id", Kind::Assistant),
    ("container", Kind::Container),
];

/// Keys whose values are the client's own data or schemas, never walked.
const OPAQUE_KEYS: [&str; 5] = [
    "metadata",
    "schema",
    "json_schema",
    "parameters",
    "properties",
];

static HINTS: LazyLock<Vec<Finder<'static>>> = LazyLock::new(|| {
    [
        "_id\"",
        "_ids\"",
        "\"conversation\"",
        "_file\"",
        "\"container\"",
        // Any escape: it may spell one of the keys above.
        "\\u",
    ]
    .iter()
    .map(|p| Finder::new(p.as_bytes()).into_owned())
    .collect()
});

/// An object id a body names, and the kind its key says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyId<'a> {
    pub kind: Kind,
    pub id: Cow<'a, str>,
}

/// Every object id `body` (JSON) names; an empty list when it names none
/// or is not JSON an object walk can read (inspection reports bad JSON).
pub fn body_ids(body: &[u8]) -> Result<Vec<BodyId<'_>>, GatewayError> {
    if !HINTS.iter().any(|hint| hint.find(body).is_some()) {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    if (Walk {
        found: &mut found,
        key: None,
    })
    .deserialize(&mut deserializer)
    .is_err()
    {
        return Ok(Vec::new());
    }
    for named in &found {
        checked(&named.id).map_err(|_| {
            GatewayError::InvalidObjectId(format!(
                "'{}' is not an object id",
                named.id.chars().take(64).collect::<String>().escape_debug()
            ))
        })?;
    }
    Ok(found)
}

/// One value in the walk, under `key` if it is an id-bearing one.
struct Walk<'f, 'a> {
    found: &'f mut Vec<BodyId<'a>>,
    key: Option<Kind>,
}

impl<'de, 'f> DeserializeSeed<'de> for Walk<'f, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, 'f> Visitor<'de> for Walk<'f, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<(), E> {
        if let Some(kind) = self.key {
            self.found.push(BodyId {
                kind,
                id: Cow::Borrowed(value),
            });
        }
        Ok(())
    }

    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        if let Some(kind) = self.key {
            self.found.push(BodyId {
                kind,
                id: Cow::Owned(value.to_owned()),
            });
        }
        Ok(())
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        // An id-bearing key's array holds ids; any other array, values.
        while seq
            .next_element_seed(Walk {
                found: &mut *self.found,
                key: self.key,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        // `"conversation": {"id": "conv_…"}` names it by its `id`.
        let parent = self.key;
        while let Some(key) = map.next_key::<crate::request::JsonKey<'de>>()? {
            if OPAQUE_KEYS.contains(&&*key) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let kind = match (parent, &*key) {
                (Some(Kind::Conversation), "id") => Some(Kind::Conversation),
                _ => ID_KEYS
                    .iter()
                    .find(|(k, _)| *k == &*key)
                    .map(|(_, kind)| *kind),
            };
            map.next_value_seed(Walk {
                found: &mut *self.found,
                key: kind,
            })?;
        }
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
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// The ids [`body_ids`] must find, read the slow way: the body decoded
/// whole by `serde_json` (keys unescaped, the last of duplicate keys
/// kept), then the same keys looked up in the value. The fuzz target and
/// the tests check the walk against it.
pub fn ids_in_decoded(body: &[u8]) -> Vec<(Kind, String)> {
    fn visit(value: &serde_json::Value, key: Option<Kind>, found: &mut Vec<(Kind, String)>) {
        use serde_json::Value;
        match value {
            Value::String(text) => {
                if let Some(kind) = key {
                    found.push((kind, text.clone()));
                }
            }
            Value::Array(items) => items.iter().for_each(|item| visit(item, key, found)),
            Value::Object(fields) => {
                for (name, value) in fields {
                    if OPAQUE_KEYS.contains(&name.as_str()) {
                        continue;
                    }
                    let kind = match (key, name.as_str()) {
                        (Some(Kind::Conversation), "id") => Some(Kind::Conversation),
                        _ => ID_KEYS
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, kind)| *kind),
                    };
                    visit(value, kind, found);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        visit(&value, None, &mut found);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `key` with every character written as a `\u` escape.
    fn escaped(key: &str) -> String {
        key.chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect()
    }

    /// N3: a key spelled with escapes is the same key to the upstream, so
    /// the walk finds its id for every id-bearing key.
    #[test]
    fn ids_under_escaped_keys_are_found_for_every_id_key() {
        for (key, kind) in ID_KEYS {
            let value = if key.ends_with("_ids") {
                r#"["obj_1"]"#
            } else {
                r#""obj_1""#
            };
            for spelled in [
                escaped(key),
                key.replacen('_', "\\u005f", 1),
                key.to_owned(),
            ] {
                let body = format!(r#"{{"model":"gpt-4o","{spelled}":{value}}}"#);
                let ids = body_ids(body.as_bytes()).unwrap();
                let found: Vec<_> = ids.iter().map(|b| (b.kind, b.id.to_string())).collect();
                assert_eq!(found, vec![(kind, "obj_1".to_owned())], "{body}");
                assert_eq!(ids_in_decoded(body.as_bytes()), found, "{body}");
            }
        }
        let conversation = r#"{"\u0063onversation":{"\u0069d":"conv_9"}}"#;
        let found: Vec<_> = body_ids(conversation.as_bytes())
            .unwrap()
            .into_iter()
            .map(|b| (b.kind, b.id.into_owned()))
            .collect();
        assert_eq!(found, vec![(Kind::Conversation, "conv_9".to_owned())]);
    }

    /// The escaped spelling of the audit's request: found, so the owner
    /// check applies.
    #[test]
    fn the_audits_escaped_previous_response_id_is_found() {
        let body =
            br#"{"model":"gpt-4o-mini","input":"x","previous_response\u005fid":"resp_theirs"}"#;
        let ids = body_ids(body).unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!((ids[0].kind, &*ids[0].id), (Kind::Response, "resp_theirs"));
    }

    #[test]
    fn paths_say_what_they_do_with_which_object() {
        use PathUse as U;
        let cases = [
            ("POST", "/files", U::Creates(Kind::File)),
            ("GET", "/files", U::Lists(Kind::File)),
            (
                "GET",
                "/files/file-abc/content",
                U::Uses(Kind::File, "file-abc"),
            ),
            (
                "DELETE",
                "/files/file-abc",
                U::Deletes(Kind::File, "file-abc"),
            ),
            (
                "POST",
                "/batches/batch_1/cancel",
                U::Uses(Kind::Batch, "batch_1"),
            ),
            (
                "GET",
                "/responses/resp_1/input_items",
                U::Uses(Kind::Response, "resp_1"),
            ),
            ("GET", "/fine_tuning/jobs", U::Lists(Kind::FineTuningJob)),
            (
                "GET",
                "/fine_tuning/jobs/ftjob-1/events",
                U::Uses(Kind::FineTuningJob, "ftjob-1"),
            ),
            ("POST", "/threads/runs", U::Creates(Kind::Thread)),
            (
                "POST",
                "/threads/thread_1/runs",
                U::Uses(Kind::Thread, "thread_1"),
            ),
            // Deleting a vector store's file deletes the association only.
            (
                "DELETE",
                "/vector_stores/vs_1/files/file-2",
                U::Uses(Kind::VectorStore, "vs_1"),
            ),
            ("POST", "/chat/completions", U::None),
            ("GET", "/chat/completions", U::Lists(Kind::ChatCompletion)),
            (
                "GET",
                "/chat/completions/chatcmpl-1",
                U::Shows(Kind::ChatCompletion, "chatcmpl-1"),
            ),
            ("GET", "/batches/batch_1", U::Shows(Kind::Batch, "batch_1")),
            ("POST", "/embeddings", U::None),
            ("GET", "/models", U::None),
            // Not the files collection, though it starts with its name.
            ("POST", "/filesystem", U::None),
        ];
        for (method, path, expected) in cases {
            assert_eq!(path_use(method, path).unwrap(), expected, "{method} {path}");
        }
    }

    #[test]
    fn an_empty_or_implausible_id_in_a_path_is_refused() {
        for path in [
            "/files//content",
            "/files/",
            "/batches/a.b",
            "/responses/%20x",
        ] {
            let err = path_use("GET", path).unwrap_err();
            assert_eq!(err.code(), "invalid_object_id", "{path}");
        }
        let long = format!("/files/{}", "a".repeat(MAX_ID_LEN + 1));
        assert!(path_use("GET", &long).is_err());
    }

    #[test]
    fn a_body_names_ids_by_its_keys_wherever_they_are() {
        let body = br#"{"model":"gpt-4o","previous_response_id":"resp_1",
            "conversation":{"id":"conv_1"},
            "input":[{"role":"user","content":[{"type":"input_file","file_id":"file-1"}]}],
            "tools":[{"type":"file_search","vector_store_ids":["vs_1","vs_2"]},
                     {"type":"code_interpreter","container":"cntr_1"}],
            "metadata":{"file_id":"not-an-object"},
            "text":{"format":{"type":"json_schema","schema":{"properties":{"file_id":{"type":"string"}}}}}}"#;
        let ids: Vec<(Kind, String)> = body_ids(body)
            .unwrap()
            .into_iter()
            .map(|b| (b.kind, b.id.into_owned()))
            .collect();
        let expected = [
            (Kind::Response, "resp_1"),
            (Kind::Conversation, "conv_1"),
            (Kind::File, "file-1"),
            (Kind::VectorStore, "vs_1"),
            (Kind::VectorStore, "vs_2"),
            (Kind::Container, "cntr_1"),
        ];
        assert_eq!(ids, expected.map(|(k, id)| (k, id.to_owned())).to_vec());
        // A code interpreter's automatic container is no id.
        let auto = br#"{"tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}"#;
        assert!(body_ids(auto).unwrap().is_empty());
    }

    #[test]
    fn a_body_without_id_keys_is_not_walked_and_a_bad_id_is_refused() {
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"tool","tool_call_id":"call_1","content":"x"}]}"#;
        assert!(body_ids(chat).unwrap().is_empty());
        let bad = br#"{"input_file_id":"../etc/passwd"}"#;
        assert_eq!(body_ids(bad).unwrap_err().code(), "invalid_object_id");
    }
}
