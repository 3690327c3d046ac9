//! Where a request that names stored objects must go, and what its answer
//! must record: [`Routing`].

use std::sync::Arc;

use super::named::{BodyId, PathUse};
use super::{Kind, Objects, Record};
use crate::error::GatewayError;
use crate::request::RequestInfo;
use crate::snapshot::{Live, NodeId};

/// What the objects a request names decide about it.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// The node that holds every object it names: the only one it may go to.
    pub node: Option<NodeId>,
    /// The caller's group, once resolved: the owner of what its answer
    /// makes known (`None` on the fast path of a request that names no
    /// object and creates none).
    pub owner: Option<Arc<str>>,
    /// The kind of object its answer creates.
    pub creates: Option<Kind>,
    /// The object a successful answer deletes.
    pub deletes: Option<String>,
    /// The object the path reads: forgotten if its node answers 404 (it
    /// was deleted through another replica, or expired upstream).
    pub under: Option<String>,
    /// Whether a JSON answer is read for the objects it makes known (held
    /// until they are recorded).
    pub reads_answer: bool,
}

impl Routing {
    /// Whether the request's answer matters to the records.
    /// The owner of what the answer makes known.
    pub fn owner(&self) -> Arc<str> {
        self.owner.clone().unwrap_or_else(|| Arc::from(""))
    }

    pub fn watches_answer(&self) -> bool {
        self.reads_answer || self.deletes.is_some() || self.under.is_some()
    }
}

/// What a request asks of stored objects.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub method: &'a str,
    /// Its operation's path below `/v1`.
    pub operation: &'a str,
    pub path_use: &'a PathUse<'a>,
    /// The ids its body names.
    pub named: &'a [BodyId<'a>],
    pub info: &'a RequestInfo,
}

/// Resolves the objects a request names for `owner`: all must be the
/// owner's, on one node that is in the config and in rotation, and that
/// serves the request's model.
pub async fn resolve(
    objects: &Objects,
    live: &Live,
    asked: Asked<'_>,
    owner: Arc<str>,
) -> Result<Routing, GatewayError> {
    let Asked {
        method,
        operation,
        path_use,
        named,
        info,
    } = asked;
    let from_path = match path_use {
        PathUse::Shows(kind, id) | PathUse::Uses(kind, id) | PathUse::Deletes(kind, id) => {
            Some((*kind, *id))
        }
        _ => None,
    };
    let mut held: Option<(String, Record)> = None;
    for (kind, id) in from_path
        .into_iter()
        .chain(named.iter().map(|n| (n.kind, &*n.id)))
    {
        let record = objects
            .find(id)
            .await
            .map_err(|_| GatewayError::StoreUnavailable)?
            .filter(|r| r.owner == owner)
            .ok_or_else(|| GatewayError::ObjectNotFound {
                kind: kind.as_str(),
                id: id.to_owned(),
            })?;
        match &held {
            Some((first, on)) if on.node != record.node => {
                return Err(GatewayError::ObjectsOnDifferentNodes {
                    first: first.clone(),
                    first_node: on.node.to_string(),
                    second: id.to_owned(),
                    second_node: record.node.to_string(),
                });
            }
            Some(_) => {}
            None => held = Some((id.to_owned(), record)),
        }
    }
    let node = match &held {
        Some((id, record)) => Some(holding_node(live, id, record, info)?),
        None => None,
    };
    let creates = match path_use {
        PathUse::Creates(Kind::Response) if info.store == Some(false) => None,
        PathUse::Creates(kind) => Some(*kind),
        // A chat completion is stored only when it asks to be.
        _ if method == "POST" && operation == "/chat/completions" && info.store == Some(true) => {
            Some(Kind::ChatCompletion)
        }
        _ => None,
    };
    Ok(Routing {
        node,
        owner: Some(owner),
        creates,
        deletes: match path_use {
            PathUse::Deletes(_, id) => Some((*id).to_owned()),
            _ => None,
        },
        under: match path_use {
            PathUse::Shows(_, id) => Some((*id).to_owned()),
            _ => None,
        },
        reads_answer: creates.is_some()
            || matches!(path_use, PathUse::Shows(..) | PathUse::Uses(..)),
    })
}

/// The node holding `id`, if the request may go there.
fn holding_node(
    live: &Live,
    id: &str,
    record: &Record,
    info: &RequestInfo,
) -> Result<NodeId, GatewayError> {
    let unavailable = |why| GatewayError::ObjectUnavailable {
        kind: record.kind.as_str(),
        id: id.to_owned(),
        node: record.node.to_string(),
        why,
    };
    let node = live
        .node_ids()
        .find(|n| live.node(*n).name == record.node)
        .ok_or_else(|| unavailable("no longer in the config"))?;
    if !live.node(node).health.in_rotation() {
        return Err(unavailable("out of rotation"));
    }
    if let Some(model) = info.model.as_deref() {
        let serves = live
            .candidates(Some(model))
            .is_ok_and(|nodes| nodes.contains(&node));
        if !serves {
            return Err(GatewayError::ModelNotOnObjectNode {
                model: model.to_owned(),
                node: record.node.to_string(),
                kind: record.kind.as_str(),
                id: id.to_owned(),
            });
        }
    }
    Ok(node)
}
