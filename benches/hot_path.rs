//! Hot-path benchmarks: token counting (and the tokenizer-crate choice),
//! node selection, and limiter reserve + release against a naive baseline.
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark that cannot set up should stop loudly"
)]

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use balancer::limits::{Demand, HeadroomSignal, Limiter, Load, Quota};
use balancer::selection;
use balancer::snapshot::NodeId;
use balancer::tokens::Encoding;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::time::Instant;

/// About 1 KiB of mixed English prose, code and numbers.
fn one_kib() -> String {
    let text = "The gateway measures every request: bytes, and tokens counted with the model's \
                real tokenizer. fn main() { println!(\"{}\", 42 * 1024); } Prices rose 3.7% in Q2 2026, \
                while latency fell from 12.5 ms to 0.8 ms. ";
    text.repeat(1024 / text.len() + 1)[..1024].to_owned()
}

fn tokens(c: &mut Criterion) {
    let mut group = c.benchmark_group("tokens");
    let text = one_kib();
    group.throughput(Throughput::Bytes(text.len() as u64));
    let tik_cl = tiktoken_rs::cl100k_base().unwrap();
    let tik_o = tiktoken_rs::o200k_base().unwrap();
    for (name, encoding, bpe, tik) in [
        (
            "cl100k_base",
            Encoding::Cl100kBase,
            bpe_openai::cl100k_base(),
            &tik_cl,
        ),
        (
            "o200k_base",
            Encoding::O200kBase,
            bpe_openai::o200k_base(),
            &tik_o,
        ),
    ] {
        // What the gateway counts with (the `tiktoken` crate).
        group.bench_with_input(BenchmarkId::new("tiktoken", name), &text, |b, t| {
            b.iter(|| encoding.count(black_box(t)))
        });
        // The previous choice: a fresh encoder per piece, a shared regex pool.
        group.bench_with_input(BenchmarkId::new("bpe-openai", name), &text, |b, t| {
            b.iter(|| bpe.count(black_box(t.as_str())))
        });
        group.bench_with_input(BenchmarkId::new("tiktoken-rs", name), &text, |b, t| {
            b.iter(|| tik.encode_ordinary(black_box(t)).len())
        });
    }
    group.finish();
}

/// A chat of `turns` turns (a system prompt, then a question and an answer
/// per turn, the last one a question), each message about 150 bytes of
/// prose that differs from the others.
fn conversation(turns: usize) -> Vec<u8> {
    let mut messages = vec![serde_json::json!({"role": "system", "content":
        "You are a careful assistant for an operations team. Answer in plain English and cite the runbook."})];
    for turn in 0..turns {
        messages.push(serde_json::json!({"role": "user", "content": format!(
            "Turn {turn}: our gateway in region {} sees p99 latency of {} ms on the interactive service while the nightly batch runs. Why?",
            turn * 7 % 13, 100 + turn * 37)}));
        if turn + 1 < turns {
            messages.push(serde_json::json!({"role": "assistant", "content": format!(
                "Answer {turn}: look at the queue first; request {} waited {} ms for headroom, so the batch client takes the quota the service needs.",
                turn * 1009, turn * 3 + 11)}));
        }
    }
    serde_json::to_vec(
        &serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 64, "messages": messages}),
    )
    .unwrap()
}

/// Reading a request whole (JSON, model, tokens counted) against parsing
/// its JSON alone: what counting adds, and so the most a cache of counted
/// messages could save.
fn inspect(c: &mut Criterion) {
    let mut group = c.benchmark_group("inspect");
    for turns in [1usize, 12] {
        let body = conversation(turns);
        group.throughput(Throughput::Bytes(body.len() as u64));
        let name = format!("{turns}_turns_{}_bytes", body.len());
        group.bench_with_input(
            BenchmarkId::new("read_and_count", &name),
            &body,
            |b, body| {
                b.iter(|| {
                    balancer::request::inspect("/chat/completions", black_box(body), true, 1024)
                        .unwrap()
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("json_parse_only", &name),
            &body,
            |b, body| {
                b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(body)).unwrap())
            },
        );
    }
    // The path check every request makes, against the copying version it
    // replaced (a lowercased copy and a replaced copy of every segment).
    let path = "/v1/chat/completions";
    group.bench_function("check_path", |b| {
        b.iter(|| balancer::request::check_path(black_box(path)).is_ok())
    });
    group.bench_function("check_path_copying_baseline", |b| {
        b.iter(|| {
            black_box(path).split('/').all(|segment| {
                let lower = segment.to_ascii_lowercase();
                let dots = lower.replace("%2e", ".");
                !(dots == "."
                    || dots == ".."
                    || lower.contains("%2f")
                    || lower.contains("%5c")
                    || lower.contains('\\'))
            })
        })
    });
    group.finish();
}

fn selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("selection");
    for n in [3usize, 30, 300] {
        let loads: Vec<(NodeId, Load)> = (0..n)
            .map(|i| {
                (
                    NodeId::from_index(i),
                    Load {
                        utilisation_ppm: ((i * 7919) % 1000) as u32,
                        in_flight: (i % 5) as u64,
                    },
                )
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("choose", n), &loads, |b, loads| {
            let mut rotation = 0;
            b.iter(|| {
                rotation += 1;
                selection::choose(loads.iter().copied(), rotation, n)
            })
        });
        // The full placement look: lock each node, check its headroom, read its load.
        let signal = Arc::new(HeadroomSignal::default());
        let nodes: Vec<_> = (0..n)
            .map(|_| Limiter::new(limited_quota(), Arc::clone(&signal)))
            .collect();
        group.bench_with_input(
            BenchmarkId::new("look_and_choose", n),
            &nodes,
            |b, nodes| {
                let mut rotation = 0;
                b.iter(|| {
                    rotation += 1;
                    let now = Instant::now();
                    let eligible = nodes.iter().enumerate().filter_map(|(i, u)| {
                        let load = u.load_if_fits(DEMAND, now)?;
                        Some((NodeId::from_index(i), load))
                    });
                    selection::choose(eligible, rotation, n)
                })
            },
        );
    }
    group.finish();
}

const DEMAND: Demand = Demand {
    tokens: 300,
    bytes: 2000,
    open_ended: None,
    usable: balancer::limits::share::WHOLE,
};

fn limited_quota() -> Quota {
    Quota {
        rpm: NonZeroU64::new(u64::MAX / 4),
        tpm: NonZeroU64::new(u64::MAX / 4),
        bpm: NonZeroU64::new(u64::MAX / 4),
        max_concurrency: NonZeroU64::new(1 << 40),
    }
}

/// What a first attempt might write: one map of counters behind one mutex.
#[derive(Default)]
struct NaiveLimiter {
    counters: Mutex<HashMap<String, (u64, u64, u64, u64)>>,
}

impl NaiveLimiter {
    fn reserve(&self, node: &str, demand: Demand) {
        let mut map = self.counters.lock().unwrap();
        let entry = map.entry(node.to_owned()).or_default();
        entry.0 += 1;
        entry.1 += demand.tokens;
        entry.2 += demand.bytes;
        entry.3 += 1;
    }

    fn release(&self, node: &str) {
        if let Some(entry) = self.counters.lock().unwrap().get_mut(node) {
            entry.3 -= 1;
        }
    }
}

fn limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter");
    let usage = Limiter::new(limited_quota(), Arc::new(HeadroomSignal::default()));
    group.bench_function("reserve_settle", |b| {
        b.iter(|| {
            let reservation = usage
                .try_reserve(black_box(DEMAND), Instant::now())
                .unwrap();
            reservation.settle(black_box(250));
        })
    });
    let naive = NaiveLimiter::default();
    group.bench_function("naive_mutex_hashmap_baseline", |b| {
        b.iter(|| {
            naive.reserve(black_box("node-a"), DEMAND);
            naive.release(black_box("node-a"));
        })
    });
    group.finish();
}

/// One chat request through the whole router (auth, token count,
/// selection, reservation, forwarding, relaying, settling) to a mock
/// upstream on 127.0.0.1 in the same process, beside the same request sent
/// straight to the mock: the difference is what the gateway adds.
fn whole_request(c: &mut Criterion) {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use mock_upstreams::{MockConfig, MockUpstream};
    use tower::ServiceExt;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mock = runtime
        .block_on(MockUpstream::start(
            "127.0.0.1:0".parse().unwrap(),
            MockConfig::new("sk-bench-node"),
        ))
        .unwrap();
    let toml = format!(
        "[store]\nurl = \"sqlite::memory:\"\n[auth]\nclient_keys_env = [\"BENCH_KEY\"]\n[[nodes]]\nname = \"a\"\nurl = \"{}\"\napi_key_env = \"NODE_KEY\"\nrpm = 1000000000\ntpm = 1000000000000\n",
        mock.base_url()
    );
    let env = |var: &str| match var {
        "BENCH_KEY" => Some("sk-bench-client".to_owned()),
        "NODE_KEY" => Some("sk-bench-node".to_owned()),
        _ => None,
    };
    let (config, _) = balancer::config::from_toml_str(&toml, &env).unwrap();
    let state = runtime
        .block_on(balancer::server::start(config, std::path::Path::new(".")))
        .unwrap();
    let router = balancer::app::router(state);
    let body = bytes::Bytes::from_static(
        br#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write one sentence about load balancing."}]}"#,
    );
    let client = reqwest::Client::new();
    let direct_url = format!("{}/chat/completions", mock.base_url());

    let mut group = c.benchmark_group("request");
    group.bench_function("chat_through_router_to_mock", |b| {
        b.to_async(&runtime).iter(|| async {
            let request = axum::http::Request::post("/v1/chat/completions")
                .header("authorization", "Bearer sk-bench-client")
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            black_box(response.into_body().collect().await.unwrap().to_bytes());
        })
    });
    group.bench_function("chat_straight_to_mock_baseline", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = client
                .post(&direct_url)
                .bearer_auth("sk-bench-node")
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            black_box(response.bytes().await.unwrap());
        })
    });
    group.finish();
}

/// Finding a stored client by its key: through the registry's cache (what
/// every request does) against asking the store each time (the baseline
/// the cache replaces).
fn client_lookup(c: &mut Criterion) {
    use balancer::clients::Registry;
    use balancer::keys::{hash_key, key_prefix, new_id};
    use balancer::limits::ClientLimits;
    use balancer::store::{Store, StoredClient};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = "sk-bal-benchmarkbenchmarkbenchmarkbenchmark1";
    let hash = hash_key(key.as_bytes());
    let (store, registry) = runtime.block_on(async {
        let url = secrecy::SecretString::from("sqlite::memory:".to_owned());
        let store = Store::open(&url, std::path::Path::new(".")).await.unwrap();
        store
            .insert_client(&StoredClient {
                id: new_id(),
                name: "bench".to_owned(),
                key_hash: hash,
                key_prefix: key_prefix(key),
                limits: ClientLimits::default(),
                share: balancer::limits::Share::default(),
                models: None,
                enabled: true,
                budget: None,
                created_at: 0,
            })
            .await
            .unwrap();
        let (recorder, _writer) = balancer::ledger::channel();
        let registry = Registry::new(store.clone(), std::time::Duration::from_secs(60), recorder)
            .await
            .unwrap();
        (store, registry)
    });
    let mut group = c.benchmark_group("client_lookup");
    group.bench_function("registry_cache_hit", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(registry.find(black_box(&hash)).await.unwrap()) })
    });
    group.bench_function("store_every_time", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(store.client_by_key(black_box(&hash)).await.unwrap()) })
    });
    group.finish();
}

/// Recording one answered request's metrics: the node's route for its
/// model (a copy-on-write map, no lock), its status, duration, tokens and
/// bytes; beside the same counters in one map behind one mutex.
fn metrics(c: &mut Criterion) {
    use axum::http::StatusCode;
    use balancer::metrics::NodeMetrics;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    let mut group = c.benchmark_group("metrics");
    let node = NodeMetrics::default();
    for model in ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"] {
        node.routes.route(model);
    }
    group.bench_function("record_request", |b| {
        b.iter(|| {
            let route = node.routes.route(black_box("gpt-4o-mini"));
            route.answered(StatusCode::OK, black_box(Duration::from_millis(420)));
            route
                .first_byte
                .observe(black_box(Duration::from_millis(80)));
            route
                .prompt_tokens
                .fetch_add(black_box(120), Ordering::Relaxed);
            route
                .completion_tokens
                .fetch_add(black_box(250), Ordering::Relaxed);
            route
                .request_bytes
                .fetch_add(black_box(900), Ordering::Relaxed);
            route
                .response_bytes
                .fetch_add(black_box(2400), Ordering::Relaxed);
        })
    });
    type Counters = [u64; 7];
    let naive: Mutex<HashMap<(String, String, u16), Counters>> = Mutex::default();
    group.bench_function("naive_mutex_hashmap_baseline", |b| {
        b.iter(|| {
            let mut map = naive.lock().unwrap();
            let entry = map
                .entry((
                    black_box("node-a").to_owned(),
                    black_box("gpt-4o-mini").to_owned(),
                    200,
                ))
                .or_default();
            entry[0] += 1;
            entry[1] += black_box(420);
            entry[2] += black_box(80);
            entry[3] += black_box(120);
            entry[4] += black_box(250);
            entry[5] += black_box(900);
            entry[6] += black_box(2400);
        })
    });
    group.finish();
}

/// CPU time of every thread of this process but the receiver's.
fn cpu_time() -> std::time::Duration {
    let ticks: u64 = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if comm.starts_with("otlp-receiver") {
                return None;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
            Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
        })
        .sum();
    std::time::Duration::from_millis(ticks * 10)
}

/// The counting receiver (the one in `mock-upstreams`) on a runtime of
/// its own (its threads named `otlp-receiver`, left out of [`cpu_time`]):
/// the runtime to keep, and the receiver.
fn start_receiver() -> (tokio::runtime::Runtime, mock_upstreams::otlp::OtlpReceiver) {
    use mock_upstreams::otlp::{OtlpReceiver, ReceiverOptions};
    let receiving = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-receiver")
        .enable_all()
        .build()
        .unwrap();
    let receiver = receiving
        .block_on(OtlpReceiver::start(ReceiverOptions::default()))
        .unwrap();
    (receiving, receiver)
}

/// A request's span with tracing on: made from the request's headers
/// (with a caller's `traceparent`), given its attributes and a retry
/// event, ended into the batch exporter's queue, and exported over
/// OTLP/gRPC to a receiver in this process (the protocol's generated
/// server, counting what it gets, on threads of its own). The time
/// reported is CPU time per span of every thread but the receiver's: the
/// request path, the exporter's thread and the gRPC client, each sample
/// flushed to the receiver before it ends. Read from
/// `/proc/self/task/*/stat` (10 ms ticks: samples last about a second).
/// Baseline: tracing off, no span.
fn traces(c: &mut Criterion) {
    use balancer::config::TracingSettings;
    use balancer::traces::{Answered, Tracing};
    use std::sync::Arc;
    use std::time::Duration;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_receiving, receiver) = start_receiver();
    let settings = TracingSettings {
        otlp_endpoint: Some(receiver.endpoint().to_owned()),
        service_name: "bench".to_owned(),
        export_interval: Duration::from_millis(50),
        headers: Vec::new(),
        ca_file: None,
        compression: Default::default(),
    };
    let tracing = runtime
        .block_on(async { Tracing::start(&settings) })
        .unwrap()
        .unwrap();
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    let method = axum::http::Method::POST;
    let (client, a, b): (Arc<str>, Arc<str>, Arc<str>) =
        ("cl_bench".into(), "a".into(), "b".into());
    let one = || {
        let mut span = tracing.begin(&method, "/v1/chat/completions", &headers);
        span.asked("/v1/chat/completions", Some("gpt-4o-mini"), Some(&client));
        span.admitted(0);
        black_box(span.traceparent());
        span.retry(&a, "server_error");
        span.answered(Answered {
            status: 200,
            node: &b,
            attempts: 2,
            end: "complete",
            input_tokens: 120,
            output_tokens: 64,
            cost_usd: Some(0.0000564),
        });
    };
    let mut group = c.benchmark_group("traces");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    group.bench_function("span_per_request_cpu_with_export", |b| {
        b.iter_custom(|iters| {
            let before = cpu_time();
            let mut done = 0;
            while done < iters {
                // Within the exporter's queue (2,048): nothing is dropped.
                let batch = (iters - done).min(1_000);
                for _ in 0..batch {
                    one();
                }
                tracing.flush();
                done += batch;
            }
            cpu_time() - before
        })
    });
    group.bench_function("no_span_baseline", |b| b.iter(|| black_box(None::<u8>)));
    group.finish();
    tracing.shutdown();
    println!("spans the receiver got: {}", receiver.spans());
}

criterion_group!(
    benches,
    traces,
    tokens,
    inspect,
    selection,
    limiter,
    whole_request,
    client_lookup,
    metrics
);
criterion_main!(benches);
