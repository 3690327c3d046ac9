//! Entry points for the fuzz targets in `fuzz/` (and their property-test
//! twins): the parsers that read what clients and upstreams send. Not part
//! of the gateway's API.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::meter::{Meter, SseMeter};
use crate::tokens::Encoding;

/// The request inspector on a path and a body, as the proxy calls it:
/// the path check, then the body read as JSON and as an upload.
pub fn inspect(path: &str, body: &[u8]) {
    let _ = crate::request::check_path(path);
    let below_v1 = path.strip_prefix("/v1").unwrap_or(path);
    for json in [true, false] {
        if let Ok(info) = crate::request::inspect(below_v1, body, json, 1024) {
            assert!(info.demand.tokens <= crate::request::MAX_DEMAND_TOKENS);
            assert_eq!(info.demand.bytes, body.len() as u64);
        }
    }
}

/// The stream meter on an answer cut into `chunks` at arbitrary places;
/// returns the tokens it settles at.
pub fn sse(chunks: &[&[u8]]) -> Option<u64> {
    let mut meter = Meter::Sse(SseMeter::default());
    for chunk in chunks {
        meter.observe(chunk);
    }
    meter
        .usage(7, Encoding::Cl100kBase, true)
        .map(crate::meter::TokenUsage::total)
}

/// The upstream's rate-limit and retry headers, every reading the gateway
/// makes of them.
pub fn rate_limit_headers(pairs: &[(&str, &[u8])]) {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(*name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let report = crate::upstream::answer::rate_limit_report(&headers);
    let cap = crate::upstream::answer::MAX_HEADER_WAIT;
    assert!(report.reset_requests.is_none_or(|d| d <= cap));
    assert!(report.reset_tokens.is_none_or(|d| d <= cap));
    assert!(crate::upstream::answer::cooldown_of(&headers) <= cap);
    let now = tokio::time::Instant::now();
    let mut reported = crate::limits::Reported::default();
    reported.observe(
        &report,
        crate::limits::Marks::default(),
        crate::limits::Marks::default(),
        crate::limits::Counted {
            rpm: Some(100),
            tpm: Some(10_000),
            over: std::time::Duration::from_secs(10),
        },
        now,
    );
    let _ = reported.blocked_until(1, now);
    reported.take(u64::MAX);
    let _ = reported.blocked_until(u64::MAX, now + std::time::Duration::from_secs(1));
}

/// The stored-object readers on a method and path, a body, and a multipart
/// body of the same bytes: what paths and bodies name, what answers make
/// known, list queries.
pub fn objects(method: &str, path: &str, body: &[u8]) {
    use crate::objects::{answer, list, named};
    if let Ok(crate::objects::named::PathUse::Uses(_, id) | named::PathUse::Shows(_, id)) =
        named::path_use(method, path)
    {
        assert!(named::is_plausible_id(id));
    }
    if let Ok(ids) = named::body_ids(body) {
        assert!(ids.iter().all(|b| named::is_plausible_id(&b.id)));
    }
    object_ids(body);
    for created in [None, Some(crate::objects::Kind::File)] {
        assert!(
            answer::sightings(body, created)
                .iter()
                .all(|s| named::is_plausible_id(&s.id))
        );
    }
    let _ = list::ListQuery::parse(std::str::from_utf8(body).ok());
    let body = bytes::Bytes::copy_from_slice(body);
    let content_type = "multipart/form-data; boundary=XyZ";
    let read = crate::request::multipart::inspect(path, None, content_type, &body);
    if let Ok(info) = ready(read) {
        assert_eq!(info.demand.bytes, body.len() as u64);
    }
}

/// The walk that finds the object ids a body names, against `serde_json`
/// decoding the body whole: every id the decoded value holds under an
/// id-bearing key (escaped or not) is found by the walk, or the walk
/// refuses the body; without duplicate keys the two agree exactly.
pub fn object_ids(body: &[u8]) {
    use crate::objects::named;
    let decoded = named::ids_in_decoded(body);
    // Refused (Err): some id the walk found is no id; the request gets 400.
    if let Ok(found) = named::body_ids(body) {
        let mut found: Vec<_> = found
            .iter()
            .map(|b| (b.kind.as_str(), b.id.to_string()))
            .collect();
        let mut decoded: Vec<_> = decoded
            .into_iter()
            .map(|(k, id)| (k.as_str(), id))
            .collect();
        for id in &decoded {
            assert!(found.contains(id), "{id:?} decoded, not found");
        }
        // Duplicate keys: the walk sees every value, the value the last.
        // (The decoded value's keys are sorted: compare as sets.)
        if found.len() == decoded.len() {
            found.sort();
            decoded.sort();
            assert_eq!(found, decoded);
        }
    }
}

/// Runs a future that never waits (its input is all in memory).
fn ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// The config loader on a TOML text (no variables set).
pub fn config(text: &str) {
    if let Ok((config, _)) = crate::config::from_toml_str(text, &|_| None) {
        let _ = config.render();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every seed of `target` under `fuzz/seeds/`.
    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
        seeds
    }

    /// Bodies built from id keys, decoys and nesting, every key written
    /// plainly or with escapes at random: the walk finds what `serde_json`
    /// finds in the decoded body (the fuzz target's check, on a budget).
    #[test]
    fn the_walk_finds_the_ids_serde_json_decodes_under_escaped_keys() {
        use rand::{Rng, SeedableRng};
        const KEYS: [&str; 16] = [
            "previous_response_id",
            "conversation",
            "input_file_id",
            "file_id",
            "file_ids",
            "training_file",
            "validation_file",
            "vector_store_ids",
            "thread_id",
            "assistant_id",
            "container",
            "id",
            "metadata",
            "schema",
            "input",
            "model",
        ];
        fn key(rng: &mut rand::rngs::StdRng) -> String {
            let name = KEYS[rng.random_range(0..KEYS.len())];
            name.chars()
                .map(|c| {
                    if rng.random_bool(0.3) {
                        format!("\\u{:04X}", c as u32)
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        }
        fn value(rng: &mut rand::rngs::StdRng, depth: u32) -> String {
            match rng.random_range(0..if depth > 3 { 2 } else { 4 }) {
                0 => format!("\"obj_{}\"", rng.random_range(0..100)),
                1 => "7".to_owned(),
                2 => {
                    let items: Vec<String> = (0..rng.random_range(0..3))
                        .map(|_| value(rng, depth + 1))
                        .collect();
                    format!("[{}]", items.join(","))
                }
                _ => {
                    let fields: Vec<String> = (0..rng.random_range(0..4))
                        .map(|_| format!("\"{}\":{}", key(rng), value(rng, depth + 1)))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(28);
        let mut with_ids = 0;
        for _ in 0..3_000 {
            let fields: Vec<String> = (0..rng.random_range(1..5))
                .map(|_| format!("\"{}\":{}", key(&mut rng), value(&mut rng, 0)))
                .collect();
            let body = format!("{{{}}}", fields.join(","));
            super::object_ids(body.as_bytes());
            with_ids +=
                usize::from(!crate::objects::named::ids_in_decoded(body.as_bytes()).is_empty());
        }
        assert!(with_ids > 500, "the generator names ids often ({with_ids})");
    }

    /// The committed seed corpus runs through every target as the fuzzers
    /// feed it (the long runs are `cargo fuzz run`, see the README).
    #[test]
    fn every_seed_runs_through_its_target() {
        for (_, data) in seeds("inspect") {
            let (path, body) = match data.iter().position(|b| *b == b'\n') {
                Some(at) => (&data[..at], &data[at + 1..]),
                None => (&b"/v1/chat/completions"[..], &data[..]),
            };
            super::inspect(&String::from_utf8_lossy(path), body);
        }
        for (_, data) in seeds("sse_meter") {
            let (size, body) = data.split_first().unwrap();
            let chunks: Vec<&[u8]> = body.chunks(usize::from(*size) + 1).collect();
            let _ = super::sse(&chunks);
        }
        for (_, data) in seeds("rate_limit_headers") {
            let text = String::from_utf8_lossy(&data).into_owned();
            let pairs: Vec<(&str, &[u8])> = text
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim(), v.trim().as_bytes()))
                .collect();
            super::rate_limit_headers(&pairs);
        }
        for (_, data) in seeds("objects") {
            let (head, body) = match data.iter().position(|b| *b == b'\n') {
                Some(at) => (&data[..at], &data[at + 1..]),
                None => (&b"GET /files"[..], &data[..]),
            };
            let head = String::from_utf8_lossy(head);
            let (method, path) = head.split_once(' ').unwrap_or(("GET", &head));
            super::objects(method, path, body);
        }
        for (_, data) in seeds("object_ids") {
            super::object_ids(&data);
        }
        for (path, data) in seeds("config") {
            let text = String::from_utf8(data).unwrap_or_else(|_| panic!("{}", path.display()));
            super::config(&text);
        }
    }
}
