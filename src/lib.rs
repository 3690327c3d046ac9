//! `balancer`: an OpenAI-compatible gateway that spreads requests over
//! several keyed upstream deployments ("nodes") without ever pushing one past
//! its quota.
//!
//! # The request path
//! 1. [`app::router`] routes `/v1/*` to [`proxy::handle`]; `/v1/models` is
//!    answered from the config; `/healthz`, `/status` and `/metrics` need
//!    no key.
//! 2. [`auth::identify`] verifies the caller's gateway key and finds its
//!    client (declared in the config, or stored and found through
//!    [`clients::Registry`]'s cache).
//! 3. [`request::inspect`] reads model, stream flag and prompt tokens
//!    (with [`tokens`]' real tokenizers) into a [`limits::Demand`].
//! 4. [`snapshot::Live::candidates`] lists the nodes that serve the model,
//!    unless the request names stored objects ([`objects`]): then it goes
//!    to the node that holds them, for their owner only; lists of them are
//!    the gateway's own answer ([`objects::list`]).
//! 5. [`admission::Admission::admit`], the one door, holds the request's
//!    worst-case cost against its client's budget ([`money`]), applies the
//!    client's own limits and reserves on the least-loaded node in rotation
//!    ([`health::NodeHealth::in_rotation`]) with headroom
//!    ([`selection::choose`], [`limits::Limiter::try_reserve`]), or waits
//!    for headroom ([`admission::Queue`]), or refuses with `Retry-After`
//!    (the one policy in [`admission::refusal`]). With `[cluster]` the
//!    limits are shared by replicas through Redis
//!    ([`admission::shared`]).
//! 6. [`upstream::send`] forwards with the node's key, in its dialect
//!    ([`upstream::dialect`]), on a connection the request drives itself
//!    ([`upstream::connections`]); failures before any byte reached the
//!    client are retried on another node
//!    ([`admission::Admission::place_retry`]). [`upstream::judge`] reads
//!    what the answer says of the node into one [`upstream::NodeVerdict`],
//!    which the proxy applies: the rate-limit headers cap its headroom
//!    ([`limits::Reservation::observe_upstream`]), a 429 rests it, its
//!    status feeds passive health ([`health::NodeHealth::on_request`]).
//! 7. [`relay::relay`] streams the answer back untouched; when it ends,
//!    [`admission::settle`] settles the [`admission::Booking`] and the
//!    [`admission::ClientHold`] from the usage the [`meter`] saw (its cost
//!    at the node's prices, [`money::prices`]) and hands its outcome to
//!    [`outcome`], the one door out: the client's usage goes to the
//!    [`ledger`], the request is counted in [`metrics`] (atomics only),
//!    logs its one access-log line and ends its span. The gateway's own
//!    answers (refusals, `/v1/models`, unknown paths and methods, every
//!    admin API answer) are recorded there too, by one middleware.
//!
//! Every error the gateway produces is a [`error::GatewayError`], mapped to
//! the OpenAI error shape in one place. With `[tracing]`, the request is
//! one OpenTelemetry span from arrival to the end of its relay
//! ([`traces`]).
//!
//! # Beside the request path
//! - [`server::start`] builds the [`state::AppState`] and starts every
//!   background task through [`tasks::Tasks`]; [`server::run`] is all of
//!   `balancer serve`.
//! - [`probes::run`] probes nodes (over the same connections as
//!   requests, [`upstream::probe`]); [`health`] is the state machine it
//!   feeds.
//! - [`reload`] swaps in a changed config ([`state::AppState::swap`],
//!   [`snapshot::prepare`]) on a file change or SIGHUP; [`control`] is the
//!   `reload` and `stop` commands' side, through the pid file.
//! - [`objects::Objects`] keeps which node holds each stored object and
//!   whose it is, in the store.
//! - [`admin::router`] is the admin API (clients, usage, nodes) on its own
//!   listener; [`store::Store`] keeps clients and usage in SQLite or
//!   PostgreSQL; [`ledger::LedgerWriter`] writes usage in batches.
//! - [`status`] serves `/status` and the page at `/dashboard`;
//!   [`status::scrape`] serves `/metrics`.
//! - [`config`] loads and validates `Balancer.toml`; [`keys`] holds every
//!   secret.
//!
//! # Module dependencies
//! Leaves first: [`keys`], [`limits`], [`tokens`], [`metrics`], [`money`],
//! [`tasks`], [`memory`], [`deadline`] (an answer's write deadline, set by
//! the proxy and enforced by the server); [`traces`] on [`config`];
//! then [`config`], [`error`], [`store`], [`ledger`], [`health`],
//! [`clients`]; [`upstream`] (how a node is reached and what its answers
//! say) on those; [`snapshot`] builds on them, [`objects`] on the
//! snapshot, [`admission`] on the snapshot, [`state`] holds both;
//! [`outcome`] records on the state; the HTTP-facing modules ([`proxy`],
//! [`relay`], [`status`], [`admin`], [`reload`], [`probes`], [`server`])
//! sit on top. No two top-level modules import each other, and no files
//! form a cycle: `tests/house.rs` checks it.

pub(crate) mod admin;
pub(crate) mod admission;
pub mod app;
pub(crate) mod auth;
pub mod clients;
pub mod config;
pub mod control;
pub(crate) mod deadline;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod health;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod memory;
pub(crate) mod meter;
pub mod metrics;
pub mod money;
pub mod objects;
pub(crate) mod outcome;
pub(crate) mod probes;
pub(crate) mod proxy;
pub(crate) mod relay;
pub mod reload;
pub mod request;
pub mod selection;
pub mod server;
pub mod snapshot;
pub mod state;
pub(crate) mod status;
pub mod store;
pub mod tasks;
pub mod tokens;
pub mod traces;
pub mod upstream;
