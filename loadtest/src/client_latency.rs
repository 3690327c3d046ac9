//! `client-latency`: how long one upstream round trip takes at a low rate
//! with each way the gateway could hold its upstream connections, against
//! one mock, nothing else running.
//!
//! At 200 requests/s the gateway adds more latency than nginx; a stage
//! trace put most of it between sending upstream and the answer's head.
//! This measures that leg alone, `--requests` (1,000) requests one at a
//! time, `--gap` (5 ms) apart, after 50 to warm up:
//!
//! - `reqwest`, as the gateway uses it (a pooled connection driven by its
//!   own task, behind reqwest's middleware);
//! - `hyper-util`'s pooled client directly (the same connection task,
//!   without reqwest's layers);
//! - a `hyper` connection driven by the requesting task itself (no other
//!   task to wake).
//!
//! Prints p50 and p90 of each; exits 1 only if a request fails.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};

use crate::harness::{CHAT_PATH, Mocks, chat_body};

#[derive(Debug, Clone, Args)]
pub(crate) struct ClientLatencyArgs {
    /// Requests measured per client.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// The pause between requests.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    pub gap: Duration,
}

impl ClientLatencyArgs {
    pub(crate) fn smoke(&mut self) {
        self.requests = 50;
    }
}

const WARM_UP: usize = 50;

pub(crate) async fn run(args: &ClientLatencyArgs) -> anyhow::Result<bool> {
    let mocks = Mocks::start(1, &[]).await?;
    let origin = mocks.origin(0).to_owned();
    let key = mocks.keys[0].clone();
    let body = chat_body(false);
    println!(
        "client-latency: {} requests {:?} apart to one mock, one at a time",
        args.requests, args.gap
    );

    let reqwest = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()?;
    let url = format!("{origin}{CHAT_PATH}");
    let times = measure(args, || async {
        let response = reqwest
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        response.bytes().await?;
        Ok(())
    })
    .await?;
    print_line("reqwest (pooled connection, its own task)", times);

    let pooled: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let times = measure(args, || async {
        let response = pooled.request(request(&url, &key, &body)?).await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        response.into_body().collect().await?;
        Ok(())
    })
    .await?;
    print_line("hyper-util pooled client (its own task)", times);

    let authority = origin.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&authority).await?;
    stream.set_nodelay(true)?;
    let (mut send, connection) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    let mut connection = std::pin::pin!(connection);
    let mut times = Vec::with_capacity(args.requests);
    for i in 0..args.requests + WARM_UP {
        let started = Instant::now();
        let mut request = request(CHAT_PATH, &key, &body)?;
        request.headers_mut().insert("host", authority.parse()?);
        let response = tokio::select! {
            r = send.send_request(request) => r?,
            ended = &mut connection => anyhow::bail!("connection ended: {ended:?}"),
        };
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        tokio::select! {
            b = response.into_body().collect() => { b?; }
            ended = &mut connection => anyhow::bail!("connection ended: {ended:?}"),
        }
        if i >= WARM_UP {
            times.push(started.elapsed());
        }
        tokio::select! {
            () = tokio::time::sleep(args.gap) => {}
            ended = &mut connection => anyhow::bail!("connection ended: {ended:?}"),
        }
    }
    print_line("hyper connection driven by the requesting task", times);
    mocks.stop().await?;
    Ok(true)
}

fn request(uri: &str, key: &str, body: &Bytes) -> anyhow::Result<hyper::Request<Full<Bytes>>> {
    Ok(hyper::Request::post(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))?)
}

/// Times `once`, one request at a time, `args.gap` apart.
async fn measure<F, Fut>(args: &ClientLatencyArgs, once: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut times = Vec::with_capacity(args.requests);
    for i in 0..args.requests + WARM_UP {
        let started = Instant::now();
        once().await?;
        if i >= WARM_UP {
            times.push(started.elapsed());
        }
        tokio::time::sleep(args.gap).await;
    }
    Ok(times)
}

fn print_line(label: &str, mut times: Vec<Duration>) {
    times.sort_unstable();
    let at = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "  {label}: p50 {} µs, p90 {} µs",
        at(0.5).as_micros(),
        at(0.9).as_micros()
    );
}
