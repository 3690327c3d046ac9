//! What the request reader makes of each shape of request.

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
    let body = r#"{"model":"gpt-4","messages":"not a list","max_tokens":"many","stream":"yes"}"#;
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
        "/v1/files%2Fx",
        "/v1/files%5Cx",
        "/v1/%2E%2E",
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
        "/v1/.../x",
        "/v1/%2e%2e%2e/x",
        "/v1/%%2e2e/x",
        "/v1/100%25",
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
            usable: crate::limits::share::WHOLE,
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
