//! Part 2 of `throughput`: a fixed request rate to each path at once,
//! interleaved in time, to read the latency the gateway adds when nothing
//! queues.
//!
//! On a shared two-core machine the latency of one path moves by more than
//! the gateway adds from one ten-second window to the next; measured one
//! after the other, direct, gateway and nginx each met different noise
//! (nginx's own "added" p50 ranged from -0.12 to +0.30 ms). Here a single
//! clock sends request *i* to path *i mod n*, `rate` per second to each, so
//! every path sees the same moments; each round of *n* requests carries the
//! same body. Time is to the response head (as goose times it), each
//! request on its own task so a slow answer does not delay the schedule.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bodies::{PerUser, Workload};
use crate::harness::CHAT_PATH;

/// One path: an origin and the key it takes.
pub(crate) struct Path<'a> {
    pub origin: &'a str,
    pub key: &'a str,
}

/// What one path measured.
#[derive(Debug, Default)]
pub(crate) struct Paced {
    /// Time to the response head of each request answered 200, sorted.
    pub times: Vec<Duration>,
    /// Requests not answered 200 (or not answered).
    pub failures: usize,
}

impl Paced {
    pub(crate) fn p50_us(&self) -> u64 {
        if self.times.is_empty() {
            return 0;
        }
        self.times[self.times.len() / 2].as_micros() as u64
    }

    pub(crate) fn all_ok(&self) -> bool {
        !self.times.is_empty() && self.failures == 0
    }
}

/// Sends `rate` requests a second to each of `paths` for `time`,
/// interleaved, and times each.
pub(crate) async fn run(
    paths: &[Path<'_>],
    rate: usize,
    time: Duration,
    workload: Workload,
) -> anyhow::Result<Vec<Paced>> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()?;
    let bodies = PerUser::new(workload);
    let n = paths.len();
    let gap = Duration::from_secs(1) / u32::try_from(rate * n)?;
    let rounds = (time.as_secs_f64() * rate as f64) as usize;
    let mut ticks = tokio::time::interval(gap);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut requests = tokio::task::JoinSet::new();
    let mut paced: Vec<Paced> = (0..n).map(|_| Paced::default()).collect();
    let mut record = |(path, took): (usize, Option<Duration>)| match took {
        Some(took) => paced[path].times.push(took),
        None => paced[path].failures += 1,
    };
    let mut body = Bytes::new();
    for i in 0..rounds * n {
        ticks.tick().await;
        let path = &paths[i % n];
        if i % n == 0 {
            body = bodies.next(i / n, false);
        }
        let request = client
            .post(format!("{}{CHAT_PATH}", path.origin))
            .bearer_auth(path.key)
            .header("content-type", "application/json")
            .body(body.clone());
        requests.spawn(async move {
            let sent = Instant::now();
            let answer = request.send().await;
            let took = sent.elapsed();
            let ok = match answer {
                Ok(response) => response.status() == 200 && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            (i % n, ok.then_some(took))
        });
        // Take in what has ended, so the set stays small.
        while let Some(done) = requests.try_join_next() {
            record(done?);
        }
    }
    while let Some(done) = requests.join_next().await {
        record(done?);
    }
    for path in &mut paced {
        path.times.sort_unstable();
    }
    Ok(paced)
}
