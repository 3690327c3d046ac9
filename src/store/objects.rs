//! The object records ([`crate::objects`]): which node holds each stored
//! object a client created through the gateway, and whose it is.
//!
//! Invariants: a record's node and owner never change once written (a
//! later sighting of the same id only refreshes its expiry, and only if it
//! comes from the same node for the same owner); an expired record is
//! never returned.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};

/// One object's record as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub id: String,
    /// The object's kind, as [`crate::objects::Kind::as_str`] writes it.
    pub kind: String,
    pub node: String,
    /// The owning client's id; `""` for the shared group.
    pub client_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` keeps it until the object is deleted.
    pub expires_at: Option<i64>,
}

/// Which way a list runs: newest first (the API's default) or oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Desc,
    Asc,
}

const OBJECT_COLUMNS: &str = "id, kind, node, client_id, created_at, expires_at";

impl Store {
    /// Writes a record; an existing one keeps its node, owner and creation
    /// time, and takes the new expiry only if node and owner agree.
    /// Returns whether the record is `object`'s now: false when the id was
    /// already recorded for another node or owner (a record's first owner
    /// keeps it).
    pub async fn keep_object(&self, object: &StoredObject) -> Result<bool, StoreError> {
        let written = sqlx::query(
            "INSERT INTO objects (id, kind, node, client_id, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at \
             WHERE objects.node = excluded.node AND objects.client_id = excluded.client_id",
        )
        .bind(&object.id)
        .bind(&object.kind)
        .bind(&object.node)
        .bind(&object.client_id)
        .bind(object.created_at)
        .bind(object.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(written.rows_affected() > 0)
    }

    /// The record of `id`, unless it has expired by `now`.
    pub async fn object(&self, id: &str, now: i64) -> Result<Option<StoredObject>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE id = $1 AND (expires_at IS NULL OR expires_at > $2)"
        ))
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| object_from_row(&r)).transpose()
    }

    /// Forgets `id`; whether there was a record.
    pub async fn forget_object(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM objects WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Up to `limit` of `client_id`'s unexpired objects of `kind`, in
    /// `order` of creation (ties by id), after the object `after` (whose
    /// record gives the position).
    pub async fn objects_of(
        &self,
        client_id: &str,
        kind: &str,
        order: Order,
        after: Option<&StoredObject>,
        limit: u64,
        now: i64,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let (beyond, direction) = match order {
            Order::Desc => ("<", "DESC"),
            Order::Asc => (">", "ASC"),
        };
        let (created, id) = after.map_or((None, None), |a| (Some(a.created_at), Some(&a.id)));
        let rows = sqlx::query(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects \
             WHERE client_id = $1 AND kind = $2 AND (expires_at IS NULL OR expires_at > $3) \
             AND ($4 IS NULL OR created_at {beyond} $4 OR (created_at = $4 AND id {beyond} $5)) \
             ORDER BY created_at {direction}, id {direction} LIMIT $6"
        ))
        .bind(client_id)
        .bind(kind)
        .bind(now)
        .bind(created)
        .bind(id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(object_from_row).collect()
    }

    /// Every unexpired record of `client_id`'s, newest first, for the admin
    /// API.
    pub async fn client_objects(
        &self,
        client_id: &str,
        now: i64,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects \
             WHERE client_id = $1 AND (expires_at IS NULL OR expires_at > $2) \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(client_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(object_from_row).collect()
    }

    /// Deletes every record expired by `now`; how many.
    pub async fn purge_objects(&self, now: i64) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM objects WHERE expires_at IS NOT NULL AND expires_at <= $1")
                .bind(now)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }
}

fn object_from_row(row: &AnyRow) -> Result<StoredObject, StoreError> {
    Ok(StoredObject {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        node: row.try_get("node")?,
        client_id: row.try_get("client_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use secrecy::SecretString;

    use super::*;

    async fn store() -> Store {
        Store::open(&SecretString::from("sqlite::memory:"), Path::new("."))
            .await
            .unwrap()
    }

    fn object(id: &str, client: &str, created_at: i64) -> StoredObject {
        StoredObject {
            id: id.to_owned(),
            kind: "file".to_owned(),
            node: "a".to_owned(),
            client_id: client.to_owned(),
            created_at,
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn a_record_keeps_its_node_and_owner() {
        let store = store().await;
        store
            .keep_object(&object("file-1", "cl_a", 10))
            .await
            .unwrap();
        // Another node or owner claiming the id changes nothing.
        let mut other = object("file-1", "cl_b", 20);
        other.node = "b".to_owned();
        other.expires_at = Some(5);
        store.keep_object(&other).await.unwrap();
        let kept = store.object("file-1", 100).await.unwrap().unwrap();
        assert_eq!(kept, object("file-1", "cl_a", 10));
        // The same node and owner refresh the expiry; past it, it is gone.
        let mut refreshed = object("file-1", "cl_a", 10);
        refreshed.expires_at = Some(50);
        store.keep_object(&refreshed).await.unwrap();
        assert!(store.object("file-1", 49).await.unwrap().is_some());
        assert!(store.object("file-1", 50).await.unwrap().is_none());
        assert_eq!(store.purge_objects(50).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_clients_objects_page_in_creation_order_after_a_cursor() {
        let store = store().await;
        for (id, created) in [("f1", 1), ("f2", 2), ("f3", 2), ("f4", 4)] {
            store
                .keep_object(&object(id, "cl_a", created))
                .await
                .unwrap();
        }
        store.keep_object(&object("f9", "cl_b", 3)).await.unwrap();
        let ids =
            |objects: Vec<StoredObject>| objects.into_iter().map(|o| o.id).collect::<Vec<_>>();
        let page = store
            .objects_of("cl_a", "file", Order::Desc, None, 2, 0)
            .await
            .unwrap();
        assert_eq!(ids(page.clone()), ["f4", "f3"]);
        let next = store
            .objects_of("cl_a", "file", Order::Desc, page.last(), 10, 0)
            .await
            .unwrap();
        assert_eq!(ids(next), ["f2", "f1"]);
        let first = object("f1", "cl_a", 1);
        let asc = store
            .objects_of("cl_a", "file", Order::Asc, Some(&first), 10, 0)
            .await
            .unwrap();
        assert_eq!(ids(asc), ["f2", "f3", "f4"]);
        assert!(store.forget_object("f2").await.unwrap());
        assert_eq!(store.client_objects("cl_a", 0).await.unwrap().len(), 3);
    }
}
