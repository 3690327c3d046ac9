//! The admin API: clients (create, list, show, change, delete, rotate their
//! key), their usage, and the nodes' state. It listens on its own address
//! (`admin.listen`) and answers only to `Authorization: Bearer <admin
//! token>` (`admin.token_env`); with no token configured it does not listen
//! at all. `docs/openapi.yaml` describes every route.
//!
//! Invariants:
//! - A client's key appears once: in the answer that made it (create,
//!   rotate). Everything else shows its `key_prefix`; the store holds its
//!   hash.
//! - Every change is stored first, then [`Registry::changed`] drops every
//!   cached lookup, so the next request with a disabled, deleted or
//!   rotated-away key is refused.
//! - Clients declared in the config are listed (`"source": "config"`) and
//!   refuse changes with 409: the config file is their source of truth.
//! - Bad input is a 400 whose message and `param` name the field.
//!
//! [`Registry::changed`]: crate::clients::Registry::changed

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::clients::config_id;
use crate::config::{ClientConfig, models_problem};
use crate::error::GatewayError;
use crate::keys::{self, CONFIG_ID_PREFIX};
use crate::ledger::utc_day;
use crate::limits::{ClientLimits, LimitFields, Share};
use crate::money::{self, Budget, Cost, Period};
use crate::state::AppState;
use crate::status;
use crate::store::{StoreError, StoredClient, UsageTotals};

/// The admin API's routes, every one behind the admin token.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/admin/clients", get(list_clients).post(create_client))
        .route(
            "/admin/clients/{id}",
            get(show_client).patch(change_client).delete(delete_client),
        )
        .route("/admin/clients/{id}/rotate", post(rotate_key))
        .route("/admin/clients/{id}/usage", get(client_usage))
        .route("/admin/clients/{id}/budget", get(client_budget))
        .route("/admin/clients/{id}/objects", get(client_objects))
        .route("/admin/nodes", get(nodes))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        // So no route (nor a 404) answers without the token.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        // Outermost: every answer, a refused token's included, is counted
        // and logged.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::outcome::record_own,
        ))
        .with_state(state)
}

type Answer = Result<Response, GatewayError>;

async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii);
    let live = state.live();
    let allowed = match (&live.config.admin.token, presented) {
        (Some(token), Some(presented)) => token.matches(presented),
        _ => false,
    };
    if !allowed {
        return GatewayError::AdminTokenInvalid.into_response();
    }
    next.run(request).await
}

/// `POST /admin/clients` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewClient {
    name: String,
    rpm: Option<u64>,
    tpm: Option<u64>,
    burst: Option<u64>,
    rate_per_second: Option<f64>,
    max_concurrency: Option<u64>,
    priority: Option<String>,
    weight: Option<f64>,
    models: Option<Vec<String>>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    budget_usd: Option<f64>,
    budget_period: Option<String>,
}

fn enabled_by_default() -> bool {
    true
}

/// `PATCH /admin/clients/{id}` body: a field left out stays; `null` removes
/// a limit or the model list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientChanges {
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    rpm: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    tpm: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    burst: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    rate_per_second: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    max_concurrency: Option<Option<u64>>,
    priority: Option<String>,
    weight: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    models: Option<Option<Vec<String>>>,
    enabled: Option<bool>,
    /// `null` removes the budget.
    #[serde(default, deserialize_with = "present")]
    budget_usd: Option<Option<f64>>,
    budget_period: Option<String>,
}

/// A field that is there, `null` or not: `Some(None)` for `null`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

async fn create_client(State(state): State<Arc<AppState>>, body: Bytes) -> Answer {
    let new: NewClient = parse(&body)?;
    let name = valid_name(&new.name)?;
    let limits = valid_limits(LimitFields {
        rpm: new.rpm,
        tpm: new.tpm,
        burst: new.burst,
        rate_per_second: new.rate_per_second,
        max_concurrency: new.max_concurrency,
    })?;
    let share = valid_share(new.priority.as_deref(), new.weight)?;
    let models = valid_models(new.models)?;
    let budget = valid_budget(new.budget_usd, new.budget_period.as_deref())?;
    ensure_name_free(&state, &name, "").await?;
    let key = keys::new_key();
    let client = StoredClient {
        id: keys::new_id(),
        name,
        key_hash: keys::hash_key(key.expose_secret().as_bytes()),
        key_prefix: keys::key_prefix(key.expose_secret()),
        limits,
        share,
        models,
        enabled: new.enabled,
        budget,
        created_at: unix_now(),
    };
    state
        .clients
        .store()
        .insert_client(&client)
        .await
        .map_err(|e| stored(e, &client.name))?;
    state.clients.changed(Some(&client), None);
    tracing::info!(client = %client.id, name = %client.name, "client created");
    Ok((StatusCode::CREATED, Json(stored_json(&client, Some(&key)))).into_response())
}

async fn list_clients(State(state): State<Arc<AppState>>) -> Answer {
    let live = state.live();
    let mut data: Vec<Value> = live.config.clients.iter().map(declared_json).collect();
    let stored = state.clients.store().clients().await.map_err(unavailable)?;
    data.extend(stored.iter().map(|c| stored_json(c, None)));
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn show_client(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    if let Some(declared) = declared(&state, &id) {
        return Ok(Json(declared_json(&declared)).into_response());
    }
    let client = find_stored(&state, &id).await?;
    Ok(Json(stored_json(&client, None)).into_response())
}

async fn change_client(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    refuse_declared(&state, &id)?;
    let changes: ClientChanges = parse(&body)?;
    let mut client = find_stored(&state, &id).await?;
    if let Some(name) = &changes.name {
        client.name = valid_name(name)?;
        ensure_name_free(&state, &client.name, &client.id).await?;
    }
    let now = client.limits;
    let burst_now = now.bucket.map(|b| b.burst.get());
    let rate_now = now.bucket.map(|b| b.rate_per_second);
    client.limits = valid_limits(LimitFields {
        rpm: changes.rpm.unwrap_or(now.rpm.map(u64::from)),
        tpm: changes.tpm.unwrap_or(now.tpm.map(u64::from)),
        burst: changes.burst.unwrap_or(burst_now),
        rate_per_second: changes.rate_per_second.unwrap_or(rate_now),
        max_concurrency: changes
            .max_concurrency
            .unwrap_or(now.max_concurrency.map(u64::from)),
    })?;
    client.share = valid_share(
        Some(
            changes
                .priority
                .as_deref()
                .unwrap_or(client.share.priority.as_str()),
        ),
        Some(changes.weight.unwrap_or(client.share.weight)),
    )?;
    if let Some(models) = changes.models {
        client.models = valid_models(models)?;
    }
    if let Some(enabled) = changes.enabled {
        client.enabled = enabled;
    }
    if changes.budget_usd.is_some() || changes.budget_period.is_some() {
        let usd = changes
            .budget_usd
            .unwrap_or(client.budget.map(|b| b.limit.usd()));
        let period = changes
            .budget_period
            .as_deref()
            .or(client.budget.map(|b| b.period.as_str()));
        // Removing the amount removes the budget, whatever its period was.
        let period = period.filter(|_| usd.is_some());
        client.budget = valid_budget(usd, period)?;
    }
    let found = state
        .clients
        .store()
        .update_client(&client, unix_now())
        .await
        .map_err(|e| stored(e, &client.name))?;
    if !found {
        return Err(GatewayError::ClientNotFound(id));
    }
    state.clients.changed(Some(&client), None);
    state.kept.signal.freed();
    tracing::info!(client = %client.id, "client changed");
    Ok(Json(stored_json(&client, None)).into_response())
}

async fn delete_client(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    refuse_declared(&state, &id)?;
    let found = state
        .clients
        .store()
        .delete_client(&id)
        .await
        .map_err(unavailable)?;
    if !found {
        return Err(GatewayError::ClientNotFound(id));
    }
    state.clients.changed(None, Some(&id));
    // Its requests still waiting are refused at the next pass: now.
    state.kept.signal.freed();
    tracing::info!(client = %id, "client deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn rotate_key(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    refuse_declared(&state, &id)?;
    let mut client = find_stored(&state, &id).await?;
    let key = keys::new_key();
    client.key_hash = keys::hash_key(key.expose_secret().as_bytes());
    client.key_prefix = keys::key_prefix(key.expose_secret());
    let found = state
        .clients
        .store()
        .set_key(&id, &client.key_hash, &client.key_prefix, unix_now())
        .await
        .map_err(unavailable)?;
    if !found {
        return Err(GatewayError::ClientNotFound(id));
    }
    state.clients.changed(Some(&client), None);
    tracing::info!(client = %client.id, "client key rotated");
    Ok(Json(stored_json(&client, Some(&key))).into_response())
}

/// `GET /admin/clients/{id}/usage` query: days, inclusive, UTC.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
}

/// How far back a usage report goes when `from` is not given.
const DEFAULT_USAGE_DAYS: u64 = 30;

async fn client_usage(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(query) = query.map_err(|e| GatewayError::InvalidField {
        field: "query".to_owned(),
        message: e.body_text(),
    })?;
    if declared(&state, &id).is_none() {
        find_stored(&state, &id).await?;
    }
    let now = SystemTime::now();
    let to = valid_day("to", query.to)?.unwrap_or_else(|| utc_day(now));
    let from = valid_day("from", query.from)?
        .unwrap_or_else(|| utc_day(now - Duration::from_secs(86_400 * (DEFAULT_USAGE_DAYS - 1))));
    // Requests that have ended on this gateway are counted, written or not.
    state.clients.ledger().flush().await.map_err(unavailable)?;
    let rows = state
        .clients
        .store()
        .usage(&id, &from, &to)
        .await
        .map_err(unavailable)?;
    let mut total = UsageTotals::default();
    let mut by_model: BTreeMap<&str, UsageTotals> = BTreeMap::new();
    let mut by_day: BTreeMap<&str, UsageTotals> = BTreeMap::new();
    for row in &rows {
        total += row.totals;
        *by_model.entry(&row.model).or_default() += row.totals;
        *by_day.entry(&row.day).or_default() += row.totals;
    }
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut v = json!(r.totals);
            v["day"] = json!(r.day);
            v["model"] = json!(r.model);
            v
        })
        .collect();
    Ok(Json(json!({
        "object": "client.usage",
        "client_id": id,
        "from": from,
        "to": to,
        "total": total,
        "by_model": by_model,
        "by_day": by_day,
        "data": data,
    }))
    .into_response())
}

/// A client's budget and its spend in the current period: settled, held by
/// requests in flight, and what is left. With `[cluster]` and Redis
/// answering, the cluster's figures; else this replica's.
async fn client_budget(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    let budget = match declared(&state, &id) {
        Some(declared) => declared.budget,
        None => find_stored(&state, &id).await?.budget,
    };
    let period = budget.map_or(Period::Month, |b| b.period);
    let now = money::budget::unix_now();
    let start = period.start(now);
    let shared = match (&state.admission.shared, budget) {
        (Some(shared), Some(_)) => shared.budget_peek(&id, start).await,
        _ => None,
    };
    let (spent, held) = match (shared, state.clients.account(&id)) {
        (Some((spent, held)), _) => (Cost(spent), Cost(held)),
        (None, Some(account)) => {
            account
                .ready(period, now, |from| state.clients.stored_spend(&id, from))
                .await
                .map_err(unavailable)?;
            let spend = account.spend(period, now);
            (spend.spent, spend.held)
        }
        (None, None) => {
            let from = (period != Period::Total).then(|| money::budget::day_of(start));
            let spent = state
                .clients
                .stored_spend(&id, from)
                .await
                .map_err(unavailable)?;
            (Cost(spent), Cost::ZERO)
        }
    };
    let remaining =
        budget.map(|b| Cost(b.limit.nanos().saturating_sub(spent.nanos() + held.nanos())));
    Ok(Json(json!({
        "object": "client.budget",
        "client_id": id,
        "budget_usd": budget.map(|b| b.limit.usd()),
        "budget_period": period.as_str(),
        "period_start": (period != Period::Total).then(|| money::budget::rfc3339(start)),
        "period_end": period.end(start).map(money::budget::rfc3339),
        "spent_usd": spent.usd(),
        "in_flight_usd": held.usd(),
        "remaining_usd": remaining.map(Cost::usd),
    }))
    .into_response())
}

/// The stored objects a client created through the gateway (its records:
/// kind, node, times), newest first. `shared` lists the shared group's.
async fn client_objects(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    let owner = if id == SHARED_GROUP {
        ""
    } else {
        if declared(&state, &id).is_none() {
            find_stored(&state, &id).await?;
        }
        id.as_str()
    };
    let records = state.objects.of_client(owner).await.map_err(unavailable)?;
    let data: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "object": r.kind,
                "node": r.node,
                "created_at": r.created_at,
                "expires_at": r.expires_at,
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "client_id": id, "data": data})).into_response())
}

/// The path name of the group of callers without their own client key.
const SHARED_GROUP: &str = "shared";

async fn nodes(State(state): State<Arc<AppState>>) -> Answer {
    let live = state.live();
    let now = Instant::now();
    let data: Vec<Value> = live
        .node_ids()
        .map(|id| status::node_status(live.node(id), live.tier(id), now))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn unknown_url(uri: Uri) -> Response {
    GatewayError::UnknownUrl(uri.path().to_owned()).into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    GatewayError::MethodNotAllowed(method.to_string()).into_response()
}

/// Parses a JSON body; an error names the field at fault.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut json).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        GatewayError::InvalidField {
            field,
            message: err.into_inner().to_string(),
        }
    })
}

/// The most characters a client name may have.
const MAX_NAME_CHARS: usize = 100;

fn valid_name(name: &str) -> Result<String, GatewayError> {
    let name = name.trim();
    let problem = if name.is_empty() {
        Some("must not be empty")
    } else if name.chars().count() > MAX_NAME_CHARS {
        Some("must be at most 100 characters")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match problem {
        Some(message) => Err(invalid("name", message)),
        None => Ok(name.to_owned()),
    }
}

fn valid_limits(fields: LimitFields) -> Result<ClientLimits, GatewayError> {
    ClientLimits::from_parts(fields).map_err(first_problem)
}

fn valid_share(priority: Option<&str>, weight: Option<f64>) -> Result<Share, GatewayError> {
    Share::from_parts(priority, weight).map_err(first_problem)
}

/// Each problem names its field; the first is reported with it.
fn valid_budget(usd: Option<f64>, period: Option<&str>) -> Result<Option<Budget>, GatewayError> {
    crate::money::budget_of(usd, period).map_err(|(field, message)| invalid(field, message))
}

fn first_problem(problems: Vec<(&'static str, &'static str)>) -> GatewayError {
    let (field, message) = problems
        .first()
        .copied()
        .unwrap_or(("body", "invalid settings"));
    invalid(field, message)
}

fn valid_models(models: Option<Vec<String>>) -> Result<Option<Vec<String>>, GatewayError> {
    match models {
        Some(list) => match models_problem(&list) {
            Some(message) => Err(invalid("models", message)),
            None => Ok(Some(
                list.into_iter().map(|m| m.trim().to_owned()).collect(),
            )),
        },
        None => Ok(None),
    }
}

fn valid_day(field: &str, day: Option<String>) -> Result<Option<String>, GatewayError> {
    let Some(day) = day else { return Ok(None) };
    let b = day.as_bytes();
    let shaped = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if shaped {
        Ok(Some(day))
    } else {
        Err(invalid(field, "must be a day as YYYY-MM-DD"))
    }
}

fn invalid(field: &str, message: &str) -> GatewayError {
    GatewayError::InvalidField {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

async fn ensure_name_free(
    state: &AppState,
    name: &str,
    except_id: &str,
) -> Result<(), GatewayError> {
    let live = state.live();
    let declared = live.config.clients.iter().any(|c| &*c.name == name);
    if declared
        || state
            .clients
            .store()
            .name_taken(name, except_id)
            .await
            .map_err(unavailable)?
    {
        return Err(GatewayError::ClientNameTaken(name.to_owned()));
    }
    Ok(())
}

fn declared(state: &AppState, id: &str) -> Option<ClientConfig> {
    let name = id.strip_prefix(CONFIG_ID_PREFIX)?;
    state
        .live()
        .config
        .clients
        .iter()
        .find(|c| &*c.name == name)
        .cloned()
}

fn refuse_declared(state: &AppState, id: &str) -> Result<(), GatewayError> {
    match declared(state, id) {
        Some(client) => Err(GatewayError::ClientDeclaredInConfig(
            client.name.to_string(),
        )),
        None => Ok(()),
    }
}

async fn find_stored(state: &AppState, id: &str) -> Result<StoredClient, GatewayError> {
    state
        .clients
        .store()
        .client(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| GatewayError::ClientNotFound(id.to_owned()))
}

fn stored(err: StoreError, name: &str) -> GatewayError {
    match err {
        StoreError::Conflict("name") => GatewayError::ClientNameTaken(name.to_owned()),
        other => unavailable(other),
    }
}

fn unavailable(err: StoreError) -> GatewayError {
    tracing::error!(error = %err, "admin request failed in the store");
    GatewayError::StoreUnavailable
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn limits_json(limits: &ClientLimits, share: &Share) -> Value {
    json!({
        "rpm": limits.rpm.map(u64::from),
        "tpm": limits.tpm.map(u64::from),
        "burst": limits.bucket.map(|b| b.burst.get()),
        "rate_per_second": limits.bucket.map(|b| b.rate_per_second),
        "max_concurrency": limits.max_concurrency.map(u64::from),
        "priority": share.priority.as_str(),
        "weight": share.weight,
    })
}

fn stored_json(client: &StoredClient, key: Option<&SecretString>) -> Value {
    let created = UNIX_EPOCH + Duration::from_secs(u64::try_from(client.created_at).unwrap_or(0));
    let mut out = json!({
        "id": client.id,
        "name": client.name,
        "key_prefix": client.key_prefix,
        "models": client.models,
        "enabled": client.enabled,
        "source": "api",
        "created_at": humantime::format_rfc3339_seconds(created).to_string(),
    });
    merge(&mut out, limits_json(&client.limits, &client.share));
    merge(&mut out, budget_json(client.budget));
    if let Some(key) = key {
        // The one place a key leaves the gateway: the answer that made it.
        out["key"] = json!(key.expose_secret());
    }
    out
}

fn declared_json(client: &ClientConfig) -> Value {
    let mut out = json!({
        "id": &*config_id(&client.name),
        "name": &*client.name,
        "key_prefix": client.key.prefix(),
        "models": client.models,
        "enabled": client.enabled,
        "source": "config",
        "created_at": null,
    });
    merge(&mut out, limits_json(&client.limits, &client.share));
    merge(&mut out, budget_json(client.budget));
    out
}

fn budget_json(budget: Option<Budget>) -> Value {
    json!({
        "budget_usd": budget.map(|b| b.limit.usd()),
        "budget_period": budget.map(|b| b.period.as_str()),
    })
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}
