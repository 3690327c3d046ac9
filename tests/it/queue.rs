//! The queue: first come, first served for the same nodes, no blocking
//! across nodes, and a client that hangs up leaves at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::{Gateway, answering_upstream, chat, client, node, post, say};

const QUEUE: &str = "[queue]\nmax_wait = \"10s\"\n";

/// A gateway over one node that serves one request at a time, `delay` each.
async fn one_slow_node(delay: Duration) -> (wiremock::MockServer, Arc<Gateway>) {
    let server = answering_upstream(delay).await;
    let toml = format!(
        "{QUEUE}{}",
        node(
            "one",
            &crate::support::v1(&server),
            "k",
            "max_concurrency = 1"
        )
    );
    (server, Arc::new(Gateway::start(&toml).await))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_for_the_same_node_are_served_in_arrival_order() {
    let (_server, gw) = one_slow_node(Duration::from_millis(200)).await;
    let finished = Arc::new(AtomicUsize::new(0));
    let mut order = Vec::new();
    for i in 0..4 {
        let (task_gw, finished) = (Arc::clone(&gw), Arc::clone(&finished));
        order.push(tokio::spawn(async move {
            assert_eq!(
                post(
                    &client(),
                    &task_gw,
                    "/v1/chat/completions",
                    chat("gpt-4", "hi", 5)
                )
                .await
                .status(),
                200
            );
            (i, finished.fetch_add(1, Ordering::SeqCst))
        }));
        // Each request is admitted or queued before the next one is sent.
        gw.until(|s| {
            let admitted = s["nodes"][0]["limits"]["rpm"]["used"].as_u64().unwrap();
            admitted + s["queue"]["depth"].as_u64().unwrap() == i + 1
        })
        .await;
    }
    for handle in order {
        let (sent, finished) = handle.await.unwrap();
        assert_eq!(
            sent, finished as u64,
            "request {sent} finished as number {finished}"
        );
    }
    // One ran at once; three waited (max_concurrency 1).
    assert_eq!(gw.status().await["queue"]["queued_total"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_never_blocks_one_that_another_node_can_serve() {
    let busy = answering_upstream(Duration::from_secs(2)).await;
    let free = answering_upstream(Duration::ZERO).await;
    let toml = format!(
        "{QUEUE}{}{}",
        node(
            "busy",
            &crate::support::v1(&busy),
            "k",
            "max_concurrency = 1\nmodels = [\"gpt-4\"]"
        ),
        node(
            "free",
            &crate::support::v1(&free),
            "k",
            "models = [\"gpt-4o-mini\"]"
        ),
    );
    let gw = Arc::new(Gateway::start(&toml).await);
    let spawn = |model: &'static str| {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move { say(&gw, chat(model, "hi", 5)).await.status() })
    };
    let running = spawn("gpt-4");
    gw.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    let waiting = spawn("gpt-4");
    gw.until(|s| s["queue"]["depth"] == 1).await;

    let response = say(&gw, chat("gpt-4o-mini", "hi", 5)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-balancer-node"], "free");
    assert!(
        !waiting.is_finished(),
        "the other node's request should still be waiting"
    );
    assert_eq!(running.await.unwrap(), 200);
    assert_eq!(waiting.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_waiting_leaves_the_queue_at_once() {
    let (server, gw) = one_slow_node(Duration::from_secs(3)).await;
    let holder = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move { say(&gw, chat("gpt-4", "hi", 5)).await.status() })
    };
    gw.until(|s| s["nodes"][0]["in_flight"] == 1).await;
    let waiter = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move { say(&gw, chat("gpt-4", "hi", 5)).await.status() })
    };
    gw.until(|s| s["queue"]["depth"] == 1).await;
    // Hang up: aborting the task drops its connection.
    waiter.abort();
    gw.until(|s| s["queue"]["depth"] == 0).await;
    // Still in flight on the node is only the first request.
    assert_eq!(gw.status().await["nodes"][0]["in_flight"], 1);
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}
