//! The limiter's behaviour, one property per test.

use std::num::NonZeroU64;

use super::super::{GUARD, SLOT};
use super::*;

fn quota(rpm: Option<u64>, tpm: Option<u64>, bpm: Option<u64>, conc: Option<u64>) -> Quota {
    Quota {
        rpm: rpm.and_then(NonZeroU64::new),
        tpm: tpm.and_then(NonZeroU64::new),
        bpm: bpm.and_then(NonZeroU64::new),
        max_concurrency: conc.and_then(NonZeroU64::new),
    }
}

fn node(q: Quota) -> Arc<Limiter> {
    Limiter::new(q, Arc::new(HeadroomSignal::default()))
}

/// A node's limits: `quota` within every `window`, maybe charged at arrival.
fn limits(quota: Quota, window: Duration, charged_at_arrival: bool) -> NodeLimits {
    NodeLimits {
        quota,
        window,
        charged_at_arrival,
        default_completion: None,
        utilization_high: None,
    }
}

const SMALL: Demand = Demand {
    tokens: 10,
    bytes: 100,
    open_ended: None,
    usable: crate::limits::share::WHOLE,
};

#[tokio::test(start_paused = true)]
async fn rpm_admits_exactly_the_quota_then_frees_after_sixty_seconds() {
    let n = node(quota(Some(3), None, None, None));
    let start = Instant::now();
    let held: Vec<_> = (0..3)
        .map(|_| n.try_reserve(SMALL, Instant::now()).unwrap())
        .collect();
    assert!(n.try_reserve(SMALL, Instant::now()).is_none());
    drop(held);
    // Finishing does not give back a per-minute request.
    assert!(n.try_reserve(SMALL, Instant::now()).is_none());

    let Outlook::At(at) = n.outlook(SMALL, Instant::now()) else {
        panic!("expected a time-bound outlook")
    };
    assert!(at - start >= WINDOW + GUARD && at - start <= WINDOW + GUARD + SLOT);

    tokio::time::advance(WINDOW + GUARD - Duration::from_millis(1)).await;
    assert!(n.try_reserve(SMALL, Instant::now()).is_none());
    tokio::time::sleep_until(at).await;
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
}

#[tokio::test(start_paused = true)]
async fn no_rolling_minute_ever_holds_more_than_the_quota() {
    // Requests arrive every 37 ms for 3 minutes against rpm 50; every
    // admitted timestamp is checked against every 60 s span.
    let n = node(quota(Some(50), None, None, None));
    let mut admitted = Vec::new();
    for _ in 0..(180_000 / 37) {
        if let Some(r) = n.try_reserve(SMALL, Instant::now()) {
            admitted.push(Instant::now());
            r.settle(SMALL.tokens);
        }
        tokio::time::advance(Duration::from_millis(37)).await;
    }
    for (i, first) in admitted.iter().enumerate() {
        let in_span = admitted[i..]
            .iter()
            .take_while(|t| **t - *first < WINDOW)
            .count();
        assert!(in_span <= 50, "{in_span} requests within 60 s");
    }
    // And the quota was used: three minutes hold at least three windows' worth.
    assert!(admitted.len() >= 145, "only {} admitted", admitted.len());
}

#[tokio::test(start_paused = true)]
async fn tokens_are_reserved_then_corrected_to_actual_use() {
    let n = node(quota(None, Some(1000), None, None));
    let demand = Demand {
        tokens: 600,
        bytes: 0,
        open_ended: None,
        usable: crate::limits::share::WHOLE,
    };
    let r = n.try_reserve(demand, Instant::now()).unwrap();
    assert_eq!(n.snapshot(Instant::now()).pending_tokens, 600);
    assert!(n.try_reserve(demand, Instant::now()).is_none());
    r.settle(150);
    let snap = n.snapshot(Instant::now());
    assert_eq!(
        (snap.tokens, snap.pending_tokens, snap.in_flight),
        (150, 0, 0)
    );
    assert!(n.try_reserve(demand, Instant::now()).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_demand_larger_than_the_quota_never_fits() {
    let n = node(quota(None, Some(100), Some(1000), None));
    let big = Demand {
        tokens: 101,
        bytes: 10,
        open_ended: None,
        usable: crate::limits::share::WHOLE,
    };
    assert_eq!(n.outlook(big, Instant::now()), Outlook::Never(Limit::Tpm));
}

#[tokio::test(start_paused = true)]
async fn concurrency_frees_on_release_and_every_path_releases_once() {
    let n = node(quota(None, None, None, Some(2)));
    let a = n.try_reserve(SMALL, Instant::now()).unwrap();
    let b = n.try_reserve(SMALL, Instant::now()).unwrap();
    assert_eq!(n.outlook(SMALL, Instant::now()), Outlook::OnRelease);
    a.cancel();
    assert_eq!(n.snapshot(Instant::now()).in_flight, 1);
    drop(b);
    let snap = n.snapshot(Instant::now());
    assert_eq!((snap.in_flight, snap.pending_tokens), (0, 0));
    // Cancel took everything back; the plain drop kept its reservation.
    assert_eq!((snap.requests, snap.tokens, snap.bytes), (1, 10, 100));
}

#[tokio::test(start_paused = true)]
async fn response_bytes_count_against_bpm() {
    let n = node(quota(None, None, Some(1000), None));
    let r = n.try_reserve(SMALL, Instant::now()).unwrap();
    r.record_response_bytes(850);
    r.settle(10);
    assert_eq!(n.snapshot(Instant::now()).bytes, 950);
    assert!(matches!(n.outlook(SMALL, Instant::now()), Outlook::At(_)));
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_is_extended_never_shortened() {
    let n = node(Quota::default());
    let now = Instant::now();
    n.cool_down(
        now + Duration::from_secs(10),
        CooldownReason::QuotaExhausted,
    );
    n.cool_down(now + Duration::from_secs(2), CooldownReason::RateLimited);
    assert_eq!(
        n.outlook(SMALL, now),
        Outlook::At(now + Duration::from_secs(10))
    );
    let reason = n.snapshot(now).cooldown.map(|(_, r)| r);
    assert_eq!(reason, Some(CooldownReason::QuotaExhausted));
    n.cool_down(now + Duration::from_secs(12), CooldownReason::RateLimited);
    assert_eq!(
        n.outlook(SMALL, now),
        Outlook::At(now + Duration::from_secs(12))
    );
    tokio::time::advance(Duration::from_secs(12)).await;
    assert_eq!(n.outlook(SMALL, Instant::now()), Outlook::Now);
}

#[tokio::test(start_paused = true)]
async fn a_retired_node_takes_nothing_new_but_finishes_what_it_has() {
    let n = node(quota(Some(10), None, None, None));
    let held = n.try_reserve(SMALL, Instant::now()).unwrap();
    n.retire();
    assert_eq!(n.outlook(SMALL, Instant::now()), Outlook::Retired);
    assert!(n.try_reserve(SMALL, Instant::now()).is_none());
    assert!(!n.is_idle(Instant::now()));
    held.settle(SMALL.tokens);
    assert_eq!(n.snapshot(Instant::now()).in_flight, 0);
    // Its window still counts if it comes back.
    n.revive();
    assert_eq!(n.snapshot(Instant::now()).requests, 1);
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
}

#[tokio::test(start_paused = true)]
async fn the_upstreams_remaining_count_caps_headroom_and_refills_toward_the_quota() {
    let n = node(quota(Some(100), None, None, None));
    let first = n.try_reserve(SMALL, Instant::now()).unwrap();
    let second = n.try_reserve(SMALL, Instant::now()).unwrap();
    // The answer to the first says 1 remains; the second was reserved
    // after it and may not be counted yet, so nothing is left.
    first.observe_upstream(&RateLimitReport {
        remaining_requests: Some(1),
        reset_requests: Some(Duration::from_secs(3)),
        ..RateLimitReport::default()
    });
    // It refills to the node's rpm of 100 over the 3 s: one every 30 ms.
    let next = Instant::now() + Duration::from_millis(30);
    assert_eq!(n.outlook(SMALL, Instant::now()), Outlook::At(next));
    // Cancelling the second (it never reached the upstream) gives it back.
    second.cancel();
    assert_eq!(n.outlook(SMALL, Instant::now()), Outlook::Now);
    let third = n.try_reserve(SMALL, Instant::now()).unwrap();
    assert!(n.try_reserve(SMALL, Instant::now()).is_none());
    let Outlook::At(refilled) = n.outlook(SMALL, Instant::now()) else {
        panic!("the refill says when")
    };
    assert!(refilled <= Instant::now() + Duration::from_millis(31));
    tokio::time::sleep_until(refilled).await;
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
    drop((first, third));
}

#[tokio::test(start_paused = true)]
async fn a_lower_limit_the_upstream_reports_is_in_force_until_it_says_otherwise() {
    let n = node(quota(Some(100), None, None, None));
    let held = n.try_reserve(SMALL, Instant::now()).unwrap();
    let says = |limit| RateLimitReport {
        limit_requests: Some(limit),
        ..RateLimitReport::default()
    };
    assert_eq!(held.observe_upstream(&says(2)), Some((Some(2), None)));
    assert_eq!(held.observe_upstream(&says(2)), None, "logged once");
    assert_eq!(n.quota_in_force().rpm.map(u64::from), Some(2));
    assert_eq!(n.configured_quota().rpm.map(u64::from), Some(100));
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
    assert!(
        n.try_reserve(SMALL, Instant::now()).is_none(),
        "2 of 2 used"
    );
    // A limit at or above the quota lifts it.
    assert_eq!(held.observe_upstream(&says(500)), Some((None, None)));
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn load_is_the_highest_utilisation_over_limited_dimensions() {
    let n = node(quota(Some(10), Some(1000), None, Some(4)));
    let _r = n
        .try_reserve(
            Demand {
                tokens: 500,
                bytes: 0,
                open_ended: None,
                usable: crate::limits::share::WHOLE,
            },
            Instant::now(),
        )
        .unwrap();
    let load = n.load_if_fits(SMALL, Instant::now()).unwrap();
    assert_eq!(load.utilisation_ppm, 500_000);
    assert_eq!(load.in_flight, 1);
}

#[tokio::test(start_paused = true)]
async fn a_short_window_holds_the_quota_pro_rata_within_every_span() {
    // rpm 60 within every rolling 10 s: at most 10 requests, and at most
    // 60 in any minute. Requests arrive every 37 ms for two minutes.
    let n = node(quota(Some(60), None, None, None));
    n.apply(&limits(
        n.configured_quota(),
        Duration::from_secs(10),
        false,
    ));
    let mut admitted = Vec::new();
    for _ in 0..(120_000 / 37) {
        if let Some(r) = n.try_reserve(SMALL, Instant::now()) {
            admitted.push(Instant::now());
            r.settle(SMALL.tokens);
        }
        tokio::time::advance(Duration::from_millis(37)).await;
    }
    let most_within = |span: Duration| {
        (0..admitted.len())
            .map(|i| {
                admitted[i..]
                    .iter()
                    .take_while(|t| **t - admitted[i] < span)
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    assert_eq!(most_within(Duration::from_secs(10)), 10);
    assert!(most_within(WINDOW) <= 60);
    // Paced, not bursted: the minute's 60 are spread over its six spans.
    assert!(admitted.len() >= 110, "only {} admitted", admitted.len());
}

#[tokio::test(start_paused = true)]
async fn a_demand_above_the_short_allotment_fits_an_empty_short_window() {
    // tpm 600 over 10 s allots 100 tokens; 250 fits only alone.
    let n = node(quota(None, Some(600), None, None));
    n.apply(&limits(
        n.configured_quota(),
        Duration::from_secs(10),
        false,
    ));
    let big = Demand {
        tokens: 250,
        bytes: 0,
        open_ended: None,
        usable: crate::limits::share::WHOLE,
    };
    let r = n
        .try_reserve(big, Instant::now())
        .expect("an empty span admits it");
    r.settle(250);
    let Outlook::At(at) = n.outlook(SMALL, Instant::now()) else {
        panic!("the span is full")
    };
    tokio::time::sleep_until(at).await;
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
    let short = n.snapshot(Instant::now()).short.unwrap();
    assert_eq!(short.tokens, (Some(100), 10));
}

#[tokio::test(start_paused = true)]
async fn a_new_short_window_starts_from_the_use_the_minute_holds() {
    let n = node(quota(Some(60), None, None, None));
    for _ in 0..10 {
        n.try_reserve(SMALL, Instant::now()).unwrap().settle(10);
    }
    n.apply(&limits(
        n.configured_quota(),
        Duration::from_secs(10),
        false,
    ));
    assert!(n.try_reserve(SMALL, Instant::now()).is_none());
    assert_eq!(
        n.snapshot(Instant::now()).short.unwrap().requests,
        (Some(10), 10)
    );
    // Back to the minute alone: the minute's 60 admit the rest.
    n.apply(&limits(n.configured_quota(), WINDOW, false));
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
}

#[tokio::test(start_paused = true)]
async fn use_after_an_idle_minute_counts_from_its_first_slot() {
    let n = node(quota(Some(3), None, None, None));
    n.try_reserve(SMALL, Instant::now()).unwrap().settle(10);
    tokio::time::advance(WINDOW * 2).await;
    for _ in 0..3 {
        n.try_reserve(SMALL, Instant::now()).unwrap().settle(10);
    }
    assert!(n.try_reserve(SMALL, Instant::now()).is_none());
    assert_eq!(n.snapshot(Instant::now()).requests, 3);
}

#[tokio::test(start_paused = true)]
async fn a_remaining_count_without_limit_or_reset_is_read_over_the_nodes_window() {
    // Azure's answers carry only `remaining`: out of rpm 60 over 10 s,
    // 0 left refills one request a second.
    let n = node(quota(Some(60), None, None, None));
    n.apply(&limits(
        n.configured_quota(),
        Duration::from_secs(10),
        false,
    ));
    let r = n.try_reserve(SMALL, Instant::now()).unwrap();
    r.observe_upstream(&RateLimitReport {
        remaining_requests: Some(0),
        ..RateLimitReport::default()
    });
    r.settle(10);
    let Outlook::At(at) = n.outlook(SMALL, Instant::now()) else {
        panic!("the upstream said none remain")
    };
    assert_eq!(at - Instant::now(), Duration::from_secs(1));
    let remaining = n.snapshot(Instant::now()).reported.requests.unwrap();
    assert_eq!(remaining.limit, 10);
}

#[tokio::test(start_paused = true)]
async fn a_one_second_window_paces_to_the_second_and_uses_98_percent() {
    // rpm 6000 within every rolling second: at most 100; a request
    // arrives every 3 ms for 20 s.
    let n = node(quota(Some(6000), None, None, None));
    n.apply(&limits(n.configured_quota(), Duration::from_secs(1), false));
    let mut admitted = Vec::new();
    for _ in 0..(20_000 / 3) {
        if let Some(r) = n.try_reserve(SMALL, Instant::now()) {
            admitted.push(Instant::now());
            r.settle(SMALL.tokens);
        }
        tokio::time::advance(Duration::from_millis(3)).await;
    }
    for (i, first) in admitted.iter().enumerate() {
        let in_span = admitted[i..]
            .iter()
            .take_while(|t| **t - *first < Duration::from_secs(1))
            .count();
        assert!(in_span <= 100, "{in_span} requests within 1 s");
    }
    // 20 s allow 2,000; the guard band costs at most 2%.
    assert!(admitted.len() >= 1960, "only {} admitted", admitted.len());
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_charges_at_arrival_keeps_the_reservation_counted() {
    let n = node(quota(None, Some(1000), None, None));
    n.apply(&limits(n.configured_quota(), WINDOW, true));
    let asking = Demand {
        tokens: 300,
        bytes: 0,
        open_ended: None,
        usable: crate::limits::share::WHOLE,
    };
    n.try_reserve(asking, Instant::now()).unwrap().settle(25);
    assert_eq!(n.snapshot(Instant::now()).tokens, 300);
    // Above the reservation, the use counts.
    n.try_reserve(asking, Instant::now()).unwrap().settle(400);
    assert_eq!(n.snapshot(Instant::now()).tokens, 700);
}

#[tokio::test(start_paused = true)]
async fn a_provisioned_node_nearly_full_takes_nothing_new_for_a_moment() {
    let n = node(quota(None, None, None, None));
    let provisioned = NodeLimits {
        utilization_high: Some(95.0),
        ..limits(n.configured_quota(), WINDOW, true)
    };
    assert!(
        !n.observe_utilization(99.0, Instant::now()),
        "not provisioned yet"
    );
    n.apply(&provisioned);
    assert!(!n.observe_utilization(94.9, Instant::now()));
    assert!(n.try_reserve(SMALL, Instant::now()).is_some());
    assert!(n.observe_utilization(95.0, Instant::now()));
    assert!(n.try_reserve(SMALL, Instant::now()).is_none(), "held");
    tokio::time::advance(super::provisioned::PROVISIONED_HOLD).await;
    assert!(
        n.try_reserve(SMALL, Instant::now()).is_some(),
        "the hold ended"
    );
}
