//! `balancer`: an OpenAI-compatible gateway that spreads requests over
//! several keyed upstream deployments ("nodes") without ever pushing one past
//! its quota.
//!
//! # The request path
//! 1. [`app::router`] routes `/v1/*` to [`proxy::handle`]; `/v1/models` is
//!    answered from the config; `/healthz` and `/status` need no key.
//! 2. [`auth::identify`] verifies the caller's gateway key and finds its
//!    client (declared in the config, or stored and found through
//!    [`clients::Registry`]'s cache), whose own limits
//!    [`clients::Client::admit`] applies after step 3.
//! 3. [`request::inspect`] reads model, stream flag and prompt tokens
//!    (with [`tokens`]' real tokenizers) into a [`limits::Demand`].
//! 4. [`state::Live::candidates`] lists the nodes that serve the model.
//! 5. [`queue::Queue::admit`] (or, with `[cluster]`, [`cluster::place`]
//!    through limits shared in Redis) reserves on the least-loaded node in rotation
//!    ([`health::NodeHealth::in_rotation`]) with headroom
//!    ([`selection::choose`], [`limits::NodeUsage::try_reserve`]), or waits
//!    for headroom, or refuses with `Retry-After`.
//! 6. [`upstream::send`] forwards with the node's key; failures before any
//!    byte reached the client are retried on another node. The answer's
//!    rate-limit headers cap the node's headroom
//!    ([`limits::Reservation::observe_upstream`]) and its status feeds
//!    passive health ([`health::NodeHealth::on_request`]).
//! 7. [`relay::relay`] streams the answer back untouched and settles the
//!    [`limits::Reservation`] from the usage it saw; a client's usage goes to
//!    the [`usage::UsageRecorder`]. When it ends, the request is counted in
//!    [`metrics`] (atomics only) and logs its one access-log line.
//!
//! Every error the gateway produces is a [`error::GatewayError`], mapped to
//! the OpenAI error shape in one place.
//!
//! # Beside the request path
//! - [`health::run`] probes nodes in the background.
//! - [`reload`] swaps in a changed config ([`state::AppState::swap`]) on a
//!   file change or SIGHUP; [`control`] is the `reload` and `stop` commands'
//!   side, through the pid file.
//! - [`admin::router`] is the admin API (clients, usage, nodes) on its own
//!   listener; [`store::Store`] keeps clients and usage in SQLite or
//!   PostgreSQL; [`usage::UsageWriter`] writes usage in batches.
//! - [`metrics::handle`] serves `/metrics`; [`status::handle`] serves
//!   `/status`, which the page at `/dashboard` draws.
//! - [`server::run`] is all of `balancer serve`.

pub mod admin;
pub mod app;
pub mod auth;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod queue;
pub mod relay;
pub mod reload;
pub mod request;
pub mod selection;
pub mod server;
pub mod state;
pub mod status;
pub mod store;
pub mod tokens;
pub mod upstream;
pub mod usage;
