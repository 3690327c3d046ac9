//! `GET /v1/files`, `/v1/batches` and the other lists: the gateway's own
//! answer, made from the caller's records across every node.
//!
//! A page is the caller's records of the kind in the API's order (newest
//! first, or `order=asc`), after the `after` cursor, each object fetched
//! from the node that holds it (eight at a time, order kept). An object the
//! node no longer has (404) is forgotten and skipped; one on a node that is
//! out of rotation, gone, failing or at its limit is skipped for this page.
//!
//! A page looks at `limit + 1` records once, so it costs at most
//! `limit + 1` upstream calls, each counted in its node's window like a
//! request (a list cannot push a node past its quota). A `purpose` filter
//! (files) is applied to the fetched objects, so a filtered page may hold
//! fewer than `limit`; its `last_id` is the last record looked at, and
//! `has_more` says whether more records follow.
//!
//! Pages hold at most [`MAX_LIMIT`] objects (20 by default).

use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{Kind, Objects, Record};
use crate::error::GatewayError;
use crate::snapshot::Live;
use crate::store::Order;
use crate::upstream;
use crate::upstream::dialect::{self, Operation};

/// The most objects one page holds.
pub const MAX_LIMIT: u64 = 100;
const DEFAULT_LIMIT: u64 = 20;
/// Objects fetched from their nodes at once.
const FETCHES_AT_ONCE: usize = 8;
/// An object's answer is this small; a larger one is skipped.
const MAX_OBJECT_BYTES: usize = 1 << 20;

/// What a list request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: u64,
    pub after: Option<String>,
    pub order: Order,
    /// Files only: keep those with this `purpose`.
    pub purpose: Option<String>,
}

impl ListQuery {
    /// Reads `limit` (1 to [`MAX_LIMIT`]), `after`, `order` (`asc` or
    /// `desc`) and `purpose`; other parameters are ignored.
    pub fn parse(query: Option<&str>) -> Result<Self, GatewayError> {
        let mut parsed = ListQuery {
            limit: DEFAULT_LIMIT,
            after: None,
            order: Order::Desc,
            purpose: None,
        };
        let invalid = |field: &str, message: &str| GatewayError::InvalidField {
            field: field.to_owned(),
            message: message.to_owned(),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "limit" => {
                    parsed.limit = value
                        .parse::<u64>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| invalid("limit", "must be a whole number from 1 to 100"))?;
                }
                "after" if !value.is_empty() => {
                    if !super::named::is_plausible_id(value) {
                        return Err(GatewayError::InvalidObjectId(
                            "the 'after' cursor is not an object id".to_owned(),
                        ));
                    }
                    parsed.after = Some(value.to_owned());
                }
                "order" => {
                    parsed.order = match value {
                        "asc" => Order::Asc,
                        "desc" => Order::Desc,
                        _ => return Err(invalid("order", "must be 'asc' or 'desc'")),
                    };
                }
                "purpose" if !value.is_empty() => parsed.purpose = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(parsed)
    }
}

/// The caller's (`owner`'s) page of `kind`, in the API's list shape.
pub async fn page(
    objects: &Objects,
    live: &Live,
    owner: &str,
    kind: Kind,
    query: &ListQuery,
    timeout: Duration,
) -> Result<Value, GatewayError> {
    let mut cursor = match &query.after {
        Some(after) => {
            let record = objects
                .find(after)
                .await
                .map_err(|_| GatewayError::StoreUnavailable)?
                .filter(|r| &*r.owner == owner && r.kind == kind)
                .ok_or_else(|| GatewayError::ObjectNotFound {
                    kind: kind.as_str(),
                    id: after.clone(),
                })?;
            Some((after.clone(), record))
        }
        None => None,
    };
    // One look at `limit + 1` records, so a page costs at most `limit + 1`
    // upstream calls, whatever a filter keeps of them.
    let wanted = query.limit as usize + 1;
    let records = objects
        .owned(
            owner,
            kind,
            query.order,
            cursor.take().as_ref().map(|(id, r)| (id.as_str(), r)),
            wanted as u64,
        )
        .await
        .map_err(|_| GatewayError::StoreUnavailable)?;
    let more_records = records.len() == wanted;
    // With a filter, the cursor is the last record looked at (so the next
    // page goes on past those the filter dropped).
    let examined_last = records
        .get(query.limit as usize - 1)
        .or(records.last())
        .map(|(id, _)| id.clone());
    let fetched: Vec<(String, Option<Value>)> = futures_util::stream::iter(records)
        .map(|(id, record)| async move {
            let object = fetch(objects, live, kind, &id, &record, timeout).await;
            (id, object)
        })
        .buffered(FETCHES_AT_ONCE)
        .collect()
        .await;
    let mut found: Vec<(String, Value)> = Vec::with_capacity(wanted);
    for (id, object) in fetched {
        let Some(object) = object else { continue };
        let purpose_matches = query
            .purpose
            .as_deref()
            .is_none_or(|p| object["purpose"].as_str() == Some(p));
        if purpose_matches {
            found.push((id, object));
        }
    }
    let has_more = found.len() > query.limit as usize || more_records;
    found.truncate(query.limit as usize);
    let last_id = match (&query.purpose, found.last()) {
        (Some(_), _) => examined_last,
        (None, last) => last.map(|(id, _)| id.clone()),
    };
    Ok(json!({
        "object": "list",
        "first_id": found.first().map(|(id, _)| id),
        "last_id": last_id,
        "has_more": has_more,
        "data": found.into_iter().map(|(_, object)| object).collect::<Vec<_>>(),
    }))
}

/// One object from the node that holds it: `None` if it cannot be had now
/// (and forgotten if the node says it is gone).
async fn fetch(
    objects: &Objects,
    live: &Live,
    kind: Kind,
    id: &str,
    record: &Record,
    timeout: Duration,
) -> Option<Value> {
    let node = live
        .node_named(&record.node)
        .filter(|n| n.health.in_rotation())?;
    // Counted in the node's window like any request; a node at its limit
    // is skipped for this page rather than pushed past it.
    let reservation = node.limiter.try_reserve(
        crate::limits::Demand::default(),
        tokio::time::Instant::now(),
    )?;
    let path = format!("/{}/{id}", kind.collection());
    let operation = Operation {
        path: &path,
        query: None,
        model: None,
    };
    let url = dialect::url(&node.endpoint, &operation, None);
    let response = upstream::send(
        &node.endpoint,
        Method::GET,
        url,
        &HeaderMap::new(),
        Bytes::new(),
        timeout,
        None,
    )
    .await;
    reservation.settle(0);
    let response = response.ok()?;
    if response.status() == StatusCode::NOT_FOUND {
        if let Err(err) = objects.forget(id).await {
            tracing::warn!(error = %err, "cannot forget a deleted object");
        }
        return None;
    }
    if !response.status().is_success() {
        tracing::warn!(node = %node.name, status = response.status().as_u16(), "an object of a list could not be fetched");
        return None;
    }
    let body = upstream::answer::read_bounded(response, MAX_OBJECT_BYTES, timeout).await?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_query_reads_limit_after_order_and_purpose() {
        let q =
            ListQuery::parse(Some("limit=5&after=file-abc&order=asc&purpose=batch&x=1")).unwrap();
        assert_eq!(
            q,
            ListQuery {
                limit: 5,
                after: Some("file-abc".to_owned()),
                order: Order::Asc,
                purpose: Some("batch".to_owned()),
            }
        );
        assert_eq!(ListQuery::parse(None).unwrap().limit, 20);
        for bad in ["limit=0", "limit=101", "limit=x", "order=up", "after=../x"] {
            assert!(ListQuery::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
