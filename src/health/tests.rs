//! The health state machine's rules, one test each.

use secrecy::SecretString;

use super::*;

fn key(text: &str) -> NodeKey {
    NodeKey::new(SecretString::from(text.to_owned())).unwrap()
}

fn settings() -> HealthSettings {
    let n = |v: u32| std::num::NonZeroU32::new(v).unwrap();
    HealthSettings {
        unhealthy_after: n(2),
        healthy_after: n(2),
        eject_after: n(3),
        ..HealthSettings::default()
    }
}

fn failed() -> Verdict {
    Verdict::Failed("could not connect".to_owned())
}

#[tokio::test(start_paused = true)]
async fn failing_probes_take_a_node_out_and_successes_bring_it_back() {
    let s = settings();
    let h = NodeHealth::new(Arc::from("n"), key("k"), Arc::default(), Arc::default());
    h.on_probe(failed(), &s, "/models");
    assert!(h.in_rotation(), "one failure is not enough");
    h.on_probe(failed(), &s, "/models");
    assert!(!h.in_rotation());
    let reason = h.snapshot(Instant::now()).condition;
    assert!(
        reason
            .reason()
            .unwrap()
            .contains("2 probes GET /models in a row failed")
    );
    h.on_probe(Verdict::Answered, &s, "/models");
    assert!(!h.in_rotation(), "healthy_after is 2");
    h.on_probe(Verdict::Answered, &s, "/models");
    assert!(h.in_rotation());
}

fn unreachable() -> Verdict {
    Verdict::Unreachable("could not connect".to_owned())
}

#[tokio::test(start_paused = true)]
async fn unreachable_in_a_row_ejects_with_a_doubling_backoff() {
    let s = settings();
    let h = NodeHealth::new(Arc::from("n"), key("k"), Arc::default(), Arc::default());
    h.on_request(unreachable(), &s);
    h.on_request(Verdict::Answered, &s);
    h.on_request(unreachable(), &s);
    h.on_request(unreachable(), &s);
    assert!(h.in_rotation(), "the good answer broke the run");
    h.on_request(unreachable(), &s);
    assert!(!h.in_rotation());
    let first = h.snapshot(Instant::now()).next_probe_in.unwrap();
    assert_eq!(first, s.eject_backoff);
    // The re-probe fails: the next one waits twice as long.
    h.on_probe(failed(), &s, "/models");
    let second = h.snapshot(Instant::now()).next_probe_in.unwrap();
    assert_eq!(second, s.eject_backoff * 2);
    h.on_probe(Verdict::Answered, &s, "/models");
    assert!(h.in_rotation());
}

#[tokio::test(start_paused = true)]
async fn failures_judged_the_nodes_eject_it_and_a_success_ends_the_run() {
    let s = settings();
    let h = NodeHealth::new(Arc::from("n"), key("k"), Arc::default(), Arc::default());
    h.failed(failed(), None, "server_error", &s);
    h.failed(failed(), None, "server_error", &s);
    h.answered(None);
    h.failed(failed(), None, "server_error", &s);
    h.failed(failed(), None, "server_error", &s);
    assert!(h.in_rotation(), "the success broke the run");
    let ejected = h.failed(failed(), None, "server_error", &s);
    assert_eq!(
        ejected,
        Ejected {
            node: true,
            model: false
        }
    );
    assert!(!h.in_rotation());
    let reason = h.snapshot(Instant::now()).condition;
    assert!(
        reason.reason().unwrap().contains("succeeded elsewhere"),
        "{reason:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_failing_for_one_model_is_out_for_it_alone_and_comes_back_on_trial() {
    let s = settings();
    let h = NodeHealth::new(Arc::from("n"), key("k"), Arc::default(), Arc::default());
    let refused = || Verdict::KeyRefused(StatusCode::UNAUTHORIZED);
    for _ in 0..2 {
        h.failed(refused(), Some("gpt-4o"), "key_refused", &s);
        h.answered(Some("gpt-4o-mini"));
    }
    let ejected = h.failed(refused(), Some("gpt-4o"), "key_refused", &s);
    assert_eq!(
        ejected,
        Ejected {
            node: false,
            model: true
        }
    );
    let now = Instant::now();
    assert!(h.in_rotation(), "it serves its other model");
    assert!(!h.serves("gpt-4o", now) && h.serves("gpt-4o-mini", now));
    let out = h.models_out(now);
    assert_eq!(
        (out[0].model.as_str(), out[0].reason),
        ("gpt-4o", "key_refused")
    );
    assert_eq!(out[0].back_in, s.eject_backoff);
    // The backoff ends: on trial; one more failure takes it out at once,
    // for twice as long.
    tokio::time::advance(s.eject_backoff).await;
    assert!(h.serves("gpt-4o", Instant::now()));
    h.answered(Some("gpt-4o-mini"));
    h.failed(refused(), Some("gpt-4o"), "key_refused", &s);
    assert!(!h.serves("gpt-4o", Instant::now()));
    assert_eq!(h.models_out(Instant::now())[0].back_in, s.eject_backoff * 2);
    // A reload that changes its models brings it back at once.
    h.models_changed();
    assert!(h.serves("gpt-4o", Instant::now()));
    assert!(h.models_out(Instant::now()).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_success_for_a_model_clears_its_record() {
    let s = settings();
    let h = NodeHealth::new(Arc::from("n"), key("k"), Arc::default(), Arc::default());
    for _ in 0..2 {
        h.failed(failed(), Some("m"), "timeout", &s);
    }
    h.answered(Some("m"));
    for _ in 0..2 {
        h.failed(failed(), Some("m"), "timeout", &s);
    }
    assert!(
        h.serves("m", Instant::now()),
        "two in a row since the success"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_of_the_key_decides_whether_it_is_refused() {
    let s = settings();
    let h = NodeHealth::new(Arc::from("n"), key("old"), Arc::default(), Arc::default());
    // Only one key check at a time; none again soon after an accepted probe.
    assert!(h.begin_key_check(Instant::now()));
    assert!(!h.begin_key_check(Instant::now()));
    h.on_probe(Verdict::Answered, &s, "/models");
    h.end_key_check();
    assert!(!h.begin_key_check(Instant::now()), "accepted a moment ago");
    tokio::time::advance(KEY_CONFIRMED_FOR).await;
    assert!(h.begin_key_check(Instant::now()));
    h.on_probe(Verdict::KeyRefused(StatusCode::UNAUTHORIZED), &s, "/models");
    h.end_key_check();
    assert!(!h.in_rotation());
    assert_eq!(h.snapshot(Instant::now()).condition.name(), "key_refused");
}

#[tokio::test(start_paused = true)]
async fn a_refused_key_stays_out_until_the_key_changes() {
    let s = settings();
    let h = NodeHealth::new(Arc::from("n"), key("old"), Arc::default(), Arc::default());
    h.on_probe(Verdict::KeyRefused(StatusCode::UNAUTHORIZED), &s, "/models");
    assert!(!h.in_rotation());
    assert_eq!(h.snapshot(Instant::now()).condition.name(), "key_refused");
    h.on_probe(Verdict::Answered, &s, "/models");
    h.set_key(key("old"));
    assert!(!h.in_rotation(), "the same key again changes nothing");
    h.set_key(key("new"));
    assert!(h.in_rotation());
}
