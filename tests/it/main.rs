//! balancer's integration tests: the gateway in-process on an ephemeral
//! port, in front of wiremock or mock-upstreams servers on 127.0.0.1.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods,
    reason = "tests stop loudly, and spawn their own helpers (requests in the background)"
)]

mod admin;
mod admin_openapi;
mod admin_support;
mod audit;
mod audit_money;
mod audit_wire;
mod azure;
mod budgets;
mod budgets_admin;
mod cli;
mod clients;
mod cluster;
mod cluster_refusals;
mod dashboard;
mod deploy;
mod errors;
mod fairness;
mod health;
mod hostile;
mod hostile_binary;
mod judged;
mod limits;
mod metrics;
mod money;
mod objects;
mod objects_kit;
mod pg;
mod proxy;
mod queue;
mod redis;
mod reload;
mod retry;
mod sdk;
mod streaming;
mod support;
mod tiers;
mod tls;
mod traces;
