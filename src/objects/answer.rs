//! What an answer tells about stored objects: the object it created, and
//! the objects it refers to that the client may fetch next (a batch's
//! output and error files, an upload's file, a run's thread, a fine-tuning
//! job's result files).
//!
//! Only `id`, `object`, `created_at`, `expires_at`, `completed_at` and the
//! reference fields are read; the rest of the answer is skipped.

use serde::Deserialize;

use super::Kind;
use super::named::is_plausible_id;

/// One object an answer makes known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub id: String,
    pub kind: Kind,
    /// Unix seconds, as the object says (else the caller's now).
    pub created_at: Option<i64>,
    /// Unix seconds: the object's own expiry, or for a batch, its
    /// completion (its output is kept 30 days after).
    pub expires_at: Option<i64>,
    pub completed_at: Option<i64>,
}

#[derive(Deserialize)]
struct Answer {
    id: Option<String>,
    object: Option<String>,
    created_at: Option<i64>,
    /// Chat completions say `created`.
    created: Option<i64>,
    expires_at: Option<i64>,
    completed_at: Option<i64>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    thread_id: Option<String>,
    file: Option<FileRef>,
    result_files: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct FileRef {
    id: Option<String>,
    created_at: Option<i64>,
    expires_at: Option<i64>,
}

/// The objects a JSON answer makes known. `created` is the kind the
/// request creates, if it does: the answer's own `id` is one of those.
/// Anything unreadable or implausible is left out.
pub fn sightings(body: &[u8], created: Option<Kind>) -> Vec<Sighting> {
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return Vec::new();
    };
    let mut seen = Vec::new();
    let mut see = |id: Option<String>, kind: Kind, created_at, expires_at, completed_at| {
        if let Some(id) = id.filter(|id| is_plausible_id(id)) {
            seen.push(Sighting {
                id,
                kind,
                created_at,
                expires_at,
                completed_at,
            });
        }
    };
    let own_kind = created.or_else(|| answer.object.as_deref().and_then(Kind::of_object));
    if let Some(kind) = own_kind {
        // A run made with its thread answers as the run: the thread is
        // what was created.
        let id = if kind == Kind::Thread && answer.object.as_deref() == Some("thread.run") {
            answer.thread_id.clone()
        } else {
            answer.id.clone()
        };
        see(
            id,
            kind,
            answer.created_at.or(answer.created),
            answer.expires_at,
            answer.completed_at,
        );
    }
    for file in [answer.output_file_id, answer.error_file_id] {
        see(file, Kind::File, None, None, None);
    }
    if let Some(file) = answer.file {
        see(file.id, Kind::File, file.created_at, file.expires_at, None);
    }
    for file in answer.result_files.into_iter().flatten() {
        see(Some(file), Kind::File, None, None, None);
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_object_is_seen_with_its_times() {
        let file = br#"{"id":"file-abc","object":"file","bytes":12,"created_at":1700000000,"filename":"a.jsonl","purpose":"batch"}"#;
        assert_eq!(
            sightings(file, Some(Kind::File)),
            [Sighting {
                id: "file-abc".to_owned(),
                kind: Kind::File,
                created_at: Some(1_700_000_000),
                expires_at: None,
                completed_at: None,
            }]
        );
    }

    #[test]
    fn a_batch_makes_its_output_and_error_files_known() {
        let batch = br#"{"id":"batch_1","object":"batch","status":"completed","created_at":10,
            "completed_at":20,"expires_at":99,"output_file_id":"file-out","error_file_id":null}"#;
        let seen = sightings(batch, None);
        let ids: Vec<(&str, Kind)> = seen.iter().map(|s| (s.id.as_str(), s.kind)).collect();
        assert_eq!(ids, [("batch_1", Kind::Batch), ("file-out", Kind::File)]);
        assert_eq!(seen[0].completed_at, Some(20));
    }

    #[test]
    fn a_completed_upload_makes_its_file_known_and_a_run_its_thread() {
        let upload = br#"{"id":"upload_1","object":"upload","status":"completed","file":{"id":"file-9","object":"file","created_at":5}}"#;
        let ids: Vec<String> = sightings(upload, None).into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["upload_1", "file-9"]);
        let run = br#"{"id":"run_1","object":"thread.run","thread_id":"thread_7","created_at":3}"#;
        let seen = sightings(run, Some(Kind::Thread));
        assert_eq!(seen[0].id, "thread_7");
        assert_eq!(seen[0].kind, Kind::Thread);
    }

    #[test]
    fn garbage_and_implausible_ids_are_left_out() {
        assert!(sightings(b"not json", Some(Kind::File)).is_empty());
        assert!(sightings(br#"{"id":"../x","object":"file"}"#, None).is_empty());
        assert!(sightings(br#"{"object":"list","data":[]}"#, None).is_empty());
    }
}
