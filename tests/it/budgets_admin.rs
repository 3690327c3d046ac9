//! Budgets through the admin API: set, changed, read, removed, and the
//! bad values it refuses.

use serde_json::{Value, json};
use wiremock::ResponseTemplate;

use crate::money::{admin_get, close, gateway};
use crate::support::{ADMIN_TOKEN, Gateway, answering, chat, chat_answer, client, send_json, v1};

/// Calls the admin API: status and JSON body.
async fn admin(gw: &Gateway, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let response = client()
        .request(method, gw.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Budgets the admin API refuses, each naming its field.
async fn bad_budgets_are_refused(gw: &Gateway) {
    for (body, field) in [
        (json!({"name": "x", "budget_usd": -1}), "budget_usd"),
        (json!({"name": "x", "budget_usd": "ten"}), "budget_usd"),
        (
            json!({"name": "x", "budget_usd": 1, "budget_period": "week"}),
            "budget_period",
        ),
        (json!({"name": "x", "budget_period": "day"}), "budget_usd"),
    ] {
        let post = reqwest::Method::POST;
        let (status, answer) = admin(gw, post, "/admin/clients", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
}

#[tokio::test]
async fn the_admin_api_sets_changes_and_reads_a_budget() {
    use reqwest::Method;
    let upstream = answering(ResponseTemplate::new(200).set_body_json(chat_answer(0, 1_000))).await;
    let gw = gateway(&v1(&upstream), "", "").await;
    bad_budgets_are_refused(&gw).await;
    let (status, made) = admin(
        &gw,
        Method::POST,
        "/admin/clients",
        json!({"name": "app", "budget_usd": 0.0041, "budget_period": "day"}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(
        (made["budget_usd"].as_f64(), made["budget_period"].as_str()),
        (Some(0.0041), Some("day"))
    );
    let (id, key) = (
        made["id"].as_str().unwrap(),
        made["key"].as_str().unwrap().to_owned(),
    );
    let ask = async || {
        send_json(
            gw.url("/v1/chat/completions"),
            Some(&key),
            chat("m", "hi", 1_000),
        )
        .await
        .status()
        .as_u16()
    };
    assert_eq!(ask().await, 200);
    assert_eq!(ask().await, 200);
    assert_eq!(ask().await, 429, "$0.004 of $0.0041 spent");
    let budget = admin_get(&gw, &format!("/admin/clients/{id}/budget")).await;
    assert!(
        close(budget["spent_usd"].as_f64().unwrap(), 0.004),
        "{budget}"
    );
    assert!(
        close(budget["remaining_usd"].as_f64().unwrap(), 0.0001),
        "{budget}"
    );
    assert!(
        budget["period_end"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z"),
        "{budget}"
    );

    // Raised, the next request goes; removed, nothing is held.
    let (status, changed) = admin(
        &gw,
        Method::PATCH,
        &format!("/admin/clients/{id}"),
        json!({"budget_usd": 0.0062}),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["budget_period"], "day");
    assert_eq!(ask().await, 200);
    let (status, changed) = admin(
        &gw,
        Method::PATCH,
        &format!("/admin/clients/{id}"),
        json!({"budget_usd": null}),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["budget_usd"], Value::Null);
    assert_eq!(ask().await, 200);
    let budget = admin_get(&gw, &format!("/admin/clients/{id}/budget")).await;
    assert_eq!(budget["remaining_usd"], Value::Null, "{budget}");
    assert!(
        close(budget["spent_usd"].as_f64().unwrap(), 0.008),
        "{budget}"
    );
}
