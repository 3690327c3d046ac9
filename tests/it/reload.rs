//! Hot reload from the config file: what changes, what survives, and what a
//! bad file cannot break. The gateway watches its files here exactly as
//! `balancer serve` does.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mock_upstreams::{MockConfig, MockUpstream};

use crate::support::{Gateway, chat, client, node_status, post, say};

async fn mock(key: &str) -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), MockConfig::new(key))
        .await
        .unwrap()
}

fn node_with_key_file(name: &str, url: &str, key_file: &Path, extra: &str) -> String {
    format!(
        "[[nodes]]\nname = \"{name}\"\nurl = \"{url}\"\napi_key_file = \"{}\"\n{extra}\n",
        key_file.display()
    )
}

/// Replaces `path`'s contents the way editors and secret managers do:
/// a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const SETTINGS: &str = "[auth]\nclient_keys_env = [\"TEST_CLIENT_KEY\"]\n[health]\nenabled = false\n[queue]\nmax_wait = \"5s\"\n";

async fn served(gw: &Gateway, n: usize) {
    let http = client();
    for _ in 0..n {
        let response = post(
            &http,
            gw,
            "/v1/chat/completions",
            chat("gpt-4o-mini", "hi", 5),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
}

fn key_requests(mock: &MockUpstream, tail: &str) -> u64 {
    mock.stats()
        .report()
        .keys
        .get(&format!("sk-…{tail}"))
        .map_or(0, |k| k.requests)
}

#[tokio::test]
async fn an_invalid_config_is_rejected_and_the_running_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = mock("sk-mock-aaaa").await;
    let key = dir.path().join("a.key");
    std::fs::write(&key, "sk-mock-aaaa").unwrap();
    let config = dir.path().join("Balancer.toml");
    let good = format!(
        "{SETTINGS}{}",
        node_with_key_file("a", &upstream.base_url(), &key, "rpm = 50")
    );
    std::fs::write(&config, &good).unwrap();
    let gw = Gateway::start_file(&config, &[]).await;
    served(&gw, 2).await;

    replace(&config, &good.replace("rpm = 50", "rpm = 0"));
    let status = gw.reloaded(1).await;
    let reload = &status["config"]["last_reload"];
    assert_eq!(reload["ok"], false);
    assert_eq!(reload["error"], "nodes[0].rpm: must be greater than 0");
    assert_eq!(status["config"]["generation"], 1, "nothing was swapped in");
    assert_eq!(node_status(&status, "a")["limits"]["rpm"]["limit"], 50);
    served(&gw, 2).await;

    // A key file that cannot be read is as invalid as a bad field.
    std::fs::remove_file(&key).unwrap();
    replace(&config, &good.replace("rpm = 50", "rpm = 60"));
    let status = gw.reloaded(2).await;
    let error = status["config"]["last_reload"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("nodes[0].api_key_file: cannot read"),
        "{error}"
    );
    assert_eq!(node_status(&status, "a")["limits"]["rpm"]["limit"], 50);
    served(&gw, 1).await;
    assert_eq!(upstream.stats().requests(), 5);
    upstream.stop().await;
}

#[tokio::test]
async fn a_key_rotated_in_its_file_is_used_from_then_on_and_a_refused_key_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    // The upstream accepts the old and the new key during the rotation.
    let upstream = MockUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig::new("sk-old-1111").also_accept("sk-new-2222"),
    )
    .await
    .unwrap();
    let key = dir.path().join("node.key");
    std::fs::write(&key, "sk-old-1111\n").unwrap();
    let config = dir.path().join("Balancer.toml");
    std::fs::write(
        &config,
        format!(
            "{SETTINGS}{}",
            node_with_key_file("a", &upstream.base_url(), &key, "rpm = 100")
        ),
    )
    .unwrap();
    let gw = Gateway::start_file(&config, &[]).await;
    served(&gw, 3).await;
    assert_eq!(key_requests(&upstream, "1111"), 3);

    replace(&key, "sk-new-2222\n");
    let status = gw.reloaded(1).await;
    assert_eq!(
        status["config"]["last_reload"]["summary"],
        "changed: a (key)"
    );
    // The window survived the reload.
    assert_eq!(node_status(&status, "a")["limits"]["rpm"]["used"], 3);
    served(&gw, 4).await;
    assert_eq!(
        key_requests(&upstream, "1111"),
        3,
        "the old key is no longer used"
    );
    assert_eq!(key_requests(&upstream, "2222"), 4);

    // A key the upstream refuses takes the node out until the key changes.
    replace(&key, "sk-revoked-3333\n");
    gw.reloaded(2).await;
    let response = say(&gw, chat("gpt-4o-mini", "hi", 5)).await;
    assert_eq!(response.status(), 401, "the upstream's refusal, relayed");
    let status = gw.status().await;
    assert_eq!(node_status(&status, "a")["health"]["state"], "key_refused");
    let response = say(&gw, chat("gpt-4o-mini", "hi", 5)).await;
    assert_eq!(response.status(), 503, "no node in rotation");
    // The request, and the probe of the key that confirmed the refusal.
    assert_eq!(upstream.stats().unauthorized(), 2);

    replace(&key, "sk-new-2222\n");
    let status = gw.reloaded(3).await;
    assert_eq!(node_status(&status, "a")["health"]["state"], "healthy");
    served(&gw, 1).await;
    assert!(
        !status.to_string().contains("sk-"),
        "no key in /status: {status}"
    );
    upstream.stop().await;
}

/// A client sending chat requests back to back until `stop`, counting
/// each 200 in `ok`; the statuses of the others.
fn send_until_stopped(
    gw: Arc<Gateway>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let http = client();
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let body = chat("gpt-4o-mini", "hi", 5);
            let response = post(&http, &gw, "/v1/chat/completions", body).await;
            if response.status() == 200 {
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                failures.push(response.status().as_u16());
            }
        }
        failures
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_under_load_fails_no_request_and_sends_it_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let mocks = [
        mock("sk-mock-a").await,
        mock("sk-mock-b").await,
        mock("sk-mock-c").await,
    ];
    let node = |name: &str, i: usize| {
        format!(
            "[[nodes]]\nname = \"{name}\"\nurl = \"{}\"\napi_key_env = \"KEY_{i}\"\nrpm = 100000\n",
            mocks[i].base_url()
        )
    };
    let config = dir.path().join("Balancer.toml");
    let all = format!("{SETTINGS}{}{}{}", node("a", 0), node("b", 1), node("c", 2));
    std::fs::write(&config, &all).unwrap();
    let env = [
        ("KEY_0", "sk-mock-a"),
        ("KEY_1", "sk-mock-b"),
        ("KEY_2", "sk-mock-c"),
    ];
    let gw = Arc::new(Gateway::start_file(&config, &env).await);

    // 50 clients send requests back to back until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..50)
        .map(|_| send_until_stopped(Arc::clone(&gw), Arc::clone(&stop), Arc::clone(&ok)))
        .collect();
    let until_ok = |n: u64| {
        let ok = Arc::clone(&ok);
        async move {
            let within = std::time::Duration::from_secs(30);
            let reached = crate::support::eventually(within, async || {
                (ok.load(Ordering::Relaxed) >= n).then_some(())
            });
            assert!(reached.await.is_some(), "clients stalled");
        }
    };
    until_ok(300).await;

    replace(
        &config,
        &format!("{SETTINGS}{}{}", node("a", 0), node("b", 1)),
    );
    gw.reloaded(1).await;
    // Requests already on `c` finish; then it gets nothing more.
    let status = gw
        .until(|s| {
            s["retired_nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["in_flight"] == 0)
        })
        .await;
    assert_eq!(status["config"]["last_reload"]["summary"], "removed: c");
    assert_eq!(status["retired_nodes"][0]["name"], "c");
    let c_at_reload = mocks[2].stats().requests();
    let a_b_at_reload = mocks[0].stats().requests() + mocks[1].stats().requests();
    let ok_at_reload = ok.load(Ordering::Relaxed);
    until_ok(ok_at_reload + 300).await;
    stop.store(true, Ordering::Relaxed);

    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(c_at_reload > 0, "c served before the reload");
    assert_eq!(
        mocks[2].stats().requests(),
        c_at_reload,
        "c got requests after it was removed"
    );
    assert!(mocks[0].stats().requests() + mocks[1].stats().requests() >= a_b_at_reload + 300);
    for m in mocks {
        m.stop().await;
    }
}

#[tokio::test]
async fn a_request_waiting_through_a_reload_goes_to_a_node_the_reload_added() {
    let dir = tempfile::tempdir().unwrap();
    let old = mock("sk-mock-a").await;
    let new = mock("sk-mock-b").await;
    let node = |name: &str, url: &str, var: &str| {
        format!("[[nodes]]\nname = \"{name}\"\nurl = \"{url}\"\napi_key_env = \"{var}\"\nrpm = 1\n")
    };
    let config = dir.path().join("Balancer.toml");
    let settings = SETTINGS.replace("max_wait = \"5s\"", "max_wait = \"90s\"");
    std::fs::write(
        &config,
        format!("{settings}{}", node("old", &old.base_url(), "KEY_A")),
    )
    .unwrap();
    let env = [("KEY_A", "sk-mock-a"), ("KEY_B", "sk-mock-b")];
    let gw = Gateway::start_file(&config, &env).await;
    served(&gw, 1).await;

    // `old` has used its minute: the next request waits.
    let waiting = crate::support::send_in_background(&gw, chat("gpt-4o-mini", "hi", 5));
    gw.until(|s| s["queue"]["depth"] == 1).await;

    // The reload replaces `old` by `new`; the waiter moves to the new config.
    replace(
        &config,
        &format!("{settings}{}", node("new", &new.base_url(), "KEY_B")),
    );
    let (status, node) = waiting.await.unwrap();
    assert_eq!((status, node.as_str()), (200, "new"));
    assert_eq!(
        old.stats().requests(),
        1,
        "nothing more reached the removed node"
    );
    assert_eq!(new.stats().requests(), 1);
    old.stop().await;
    new.stop().await;
}

/// Forwards every connection to `to` (host:port) and counts them: the
/// upstream connections the gateway opened. Returns its own address.
async fn counting_front(to: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&accepted);
    let tasks = balancer::tasks::Tasks::new();
    tasks.clone().run(async move {
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tasks.run(async move {
                let mut outbound = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, accepted)
}

/// A reload that leaves a node's URL alone keeps its upstream connections:
/// requests after it go on the connection opened before it.
#[tokio::test]
async fn a_reload_keeps_the_upstream_connections_of_a_node_whose_url_stays() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = mock("sk-mock-a").await;
    let (front, accepted) = counting_front(upstream.addr()).await;
    let node = |rpm: u32| {
        format!(
            "[[nodes]]\nname = \"a\"\nurl = \"http://{front}/v1\"\napi_key_env = \"KEY_A\"\nrpm = {rpm}\n"
        )
    };
    let config = dir.path().join("Balancer.toml");
    std::fs::write(&config, format!("{SETTINGS}{}", node(1000))).unwrap();
    let gw = Gateway::start_file(&config, &[("KEY_A", "sk-mock-a")]).await;
    served(&gw, 2).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    replace(&config, &format!("{SETTINGS}{}", node(2000)));
    let status = gw.reloaded(1).await;
    assert_eq!(node_status(&status, "a")["limits"]["rpm"]["limit"], 2000);
    served(&gw, 2).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the connection from before the reload carried the requests after it"
    );
    assert_eq!(upstream.stats().requests(), 4);
    upstream.stop().await;
}
