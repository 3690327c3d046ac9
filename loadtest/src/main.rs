//! Load-test scenarios for balancer. Placeholder: the goose scenarios
//! (`throughput`, `reload`, `saturation`, `streaming`) arrive with the
//! harness issue; until then every scenario says so and exits non-zero.

fn main() -> std::process::ExitCode {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    eprintln!(
        "loadtest: scenario '{scenario}' is not implemented yet (the load-test harness is a separate issue)"
    );
    std::process::ExitCode::from(2)
}
