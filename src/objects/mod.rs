//! Stored objects behind a pool of keys.
//!
//! Every key sees only its own files, batches, stored responses and the
//! like. When an answer makes an object known ([`answer::sightings`]), the
//! gateway records which node holds it and which client owns it; a later
//! request that names the object, in its path or its body
//! ([`named::path_use`], [`named::body_ids`]), goes to that node, and only
//! for its owner. Lists of a kind are the gateway's own answer
//! ([`list`]), made from the caller's records.
//!
//! Invariants:
//! - A record is written before the answer that made its object known
//!   reaches the client (JSON answers are held until it is), so a client
//!   that names the object next, here or at another replica sharing the
//!   store, finds it. A streamed response's id is recorded in this
//!   replica's cache at once and in the store just after.
//! - An object the caller does not own is answered 404 `object_not_found`
//!   by the gateway, and nothing is sent upstream; so is an id the gateway
//!   never saw.
//! - A record's node and owner never change; it is forgotten when a DELETE
//!   of the object succeeds or it expires.
//!
//! Clients without their own key (the open gateway, keys from
//! `auth.client_keys_env`) are one group, owner `""`.

pub mod answer;
pub mod list;
pub mod named;
pub mod route;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{Order, Store, StoreError, StoredObject};
use crate::tasks::Tasks;

/// The kinds of object the API hands out ids for and takes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Upload,
    Batch,
    Response,
    VectorStore,
    Conversation,
    FineTuningJob,
    Assistant,
    Thread,
    Container,
    /// A chat completion stored with `store: true`.
    ChatCompletion,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::File,
        Kind::Upload,
        Kind::Batch,
        Kind::Response,
        Kind::VectorStore,
        Kind::Conversation,
        Kind::FineTuningJob,
        Kind::Assistant,
        Kind::Thread,
        Kind::Container,
        Kind::ChatCompletion,
    ];

    /// Its name in records and in the API's `object` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Upload => "upload",
            Kind::Batch => "batch",
            Kind::Response => "response",
            Kind::VectorStore => "vector_store",
            Kind::Conversation => "conversation",
            Kind::FineTuningJob => "fine_tuning.job",
            Kind::Assistant => "assistant",
            Kind::Thread => "thread",
            Kind::Container => "container",
            Kind::ChatCompletion => "chat.completion",
        }
    }

    /// The kind an answer's `object` field names.
    pub fn of_object(object: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == object)
    }

    /// Its collection's path below `/v1`, without the leading `/`.
    pub fn collection(self) -> &'static str {
        match self {
            Kind::File => "files",
            Kind::Upload => "uploads",
            Kind::Batch => "batches",
            Kind::Response => "responses",
            Kind::VectorStore => "vector_stores",
            Kind::Conversation => "conversations",
            Kind::FineTuningJob => "fine_tuning/jobs",
            Kind::Assistant => "assistants",
            Kind::Thread => "threads",
            Kind::Container => "containers",
            Kind::ChatCompletion => "chat/completions",
        }
    }

    /// Whether the API lists it (`GET /v1/{collection}`).
    pub fn listable(self) -> bool {
        matches!(
            self,
            Kind::File
                | Kind::Batch
                | Kind::VectorStore
                | Kind::FineTuningJob
                | Kind::Assistant
                | Kind::Container
                | Kind::ChatCompletion
        )
    }
}

/// How long the API keeps what it does not date itself: a stored response
/// or a finished batch's output, 30 days.
const API_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where an object lives and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub node: Arc<str>,
    /// The owning client's id; `""` for the shared group.
    pub owner: Arc<str>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

impl Record {
    fn stored(&self, id: &str) -> StoredObject {
        StoredObject {
            id: id.to_owned(),
            kind: self.kind.as_str().to_owned(),
            node: self.node.to_string(),
            client_id: self.owner.to_string(),
            created_at: self.created_at,
            expires_at: self.expires_at,
        }
    }

    fn from_stored(stored: &StoredObject) -> Option<Record> {
        Some(Record {
            kind: Kind::of_object(&stored.kind)?,
            node: Arc::from(stored.node.as_str()),
            owner: Arc::from(stored.client_id.as_str()),
            created_at: stored.created_at,
            expires_at: stored.expires_at,
        })
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How long a store that answered is taken to be writable without asking
/// again: at most one ping a second under load.
const WRITABLE_FOR: Duration = Duration::from_secs(1);

/// Records kept at most in the cache.
const CACHE_CAPACITY: u64 = 100_000;

/// The object records: the store, through a cache of found records (an
/// unknown id is not cached: another replica may record it any moment).
pub struct Objects {
    store: Store,
    /// When the store last answered a write or a ping (ms since
    /// `started`); 0 for never.
    answered_ms: std::sync::atomic::AtomicU64,
    started: tokio::time::Instant,
    /// Whether creating requests are being refused (the store did not
    /// answer its last ping).
    refusing: std::sync::atomic::AtomicBool,
    cache: moka::future::Cache<Box<str>, Record>,
    /// Expiry of a record whose object does not date itself.
    default_ttl: Duration,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").finish_non_exhaustive()
    }
}

impl Objects {
    pub fn new(store: Store, cache_ttl: Duration, default_ttl: Duration) -> Self {
        Self {
            store,
            answered_ms: std::sync::atomic::AtomicU64::new(0),
            started: tokio::time::Instant::now(),
            refusing: std::sync::atomic::AtomicBool::new(false),
            cache: moka::future::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(cache_ttl)
                .build(),
            default_ttl,
        }
    }

    /// Whether records can be written now: the store answered within the
    /// last [`WRITABLE_FOR`], or answers a ping. A request that creates an
    /// object is refused (503) when they cannot: its record would be lost,
    /// and its owner could never use or delete the object.
    pub async fn writable(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.answered_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < WRITABLE_FOR.as_millis() as u64 {
            return true;
        }
        match self.store.ping().await {
            Ok(()) => {
                self.answered_ms.store(now, Ordering::Relaxed);
                if self.refusing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the object store answers again; creating requests are served");
                }
                true
            }
            Err(err) => {
                // Said once, not once per refused request.
                if !self.refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %err, "the object store does not answer; creating requests are refused");
                }
                false
            }
        }
    }

    /// The record of `id`, if it is known and unexpired.
    pub async fn find(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let now = unix_now();
        if let Some(record) = self.cache.get(id).await
            && record.expires_at.is_none_or(|at| at > now)
        {
            return Ok(Some(record));
        }
        let found = self
            .store
            .object(id, now)
            .await?
            .and_then(|stored| Record::from_stored(&stored));
        if let Some(record) = &found {
            self.cache.insert(Box::from(id), record.clone()).await;
        }
        Ok(found)
    }

    /// The record a sighting on `node` for `owner` makes, with its expiry.
    pub fn record_of(&self, seen: &answer::Sighting, node: &Arc<str>, owner: &Arc<str>) -> Record {
        let now = unix_now();
        let created_at = seen.created_at.unwrap_or(now);
        let days = |from: i64| Some(from.saturating_add(API_RETENTION.as_secs() as i64));
        let expires_at = match seen.kind {
            // A file is kept until deleted, unless it says otherwise.
            Kind::File => seen.expires_at,
            // A batch's own `expires_at` is its deadline to finish; its
            // output is kept 30 days after it completes.
            Kind::Batch => days(seen.completed_at.unwrap_or(created_at)),
            Kind::Response | Kind::ChatCompletion => days(created_at),
            _ => seen.expires_at.or(Some(
                created_at.saturating_add(self.default_ttl.as_secs() as i64),
            )),
        };
        Record {
            kind: seen.kind,
            node: Arc::clone(node),
            owner: Arc::clone(owner),
            created_at,
            expires_at,
        }
    }

    /// Records `id` in the store and the cache. An id already recorded for
    /// another node or owner keeps its record, in the cache too.
    pub async fn keep(&self, id: &str, record: Record) -> Result<(), StoreError> {
        if self.store.keep_object(&record.stored(id)).await? {
            self.cache_keep(id, record).await;
        } else {
            // Whatever the cache held, the store's first record is the one.
            self.cache.invalidate(id).await;
        }
        Ok(())
    }

    /// Puts `record` in the cache unless it holds `id` for another node or
    /// owner: a record's owner never changes.
    async fn cache_keep(&self, id: &str, record: Record) {
        match self.cache.get(id).await {
            Some(held) if held.owner != record.owner || held.node != record.node => {}
            _ => self.cache.insert(Box::from(id), record).await,
        }
    }

    /// Records `id` in the cache now and in the store in the background:
    /// for an id seen mid-stream, which cannot wait for the store.
    pub fn keep_soon(self: &Arc<Self>, tasks: &Tasks, id: String, record: Record) {
        let objects = Arc::clone(self);
        tasks.run(async move {
            objects.cache_keep(&id, record.clone()).await;
            match objects.store.keep_object(&record.stored(&id)).await {
                Ok(true) => {}
                Ok(false) => objects.cache.invalidate(id.as_str()).await,
                Err(err) => tracing::warn!(error = %err, "cannot record a stored object"),
            }
        });
    }

    /// Forgets `id` (its object was deleted).
    pub async fn forget(&self, id: &str) -> Result<(), StoreError> {
        self.store.forget_object(id).await?;
        self.cache.invalidate(id).await;
        Ok(())
    }

    /// Up to `limit` of `owner`'s objects of `kind` after `after`.
    pub async fn owned(
        &self,
        owner: &str,
        kind: Kind,
        order: Order,
        after: Option<(&str, &Record)>,
        limit: u64,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        let after = after.map(|(id, record)| record.stored(id));
        let found = self
            .store
            .objects_of(
                owner,
                kind.as_str(),
                order,
                after.as_ref(),
                limit,
                unix_now(),
            )
            .await?;
        Ok(found
            .iter()
            .filter_map(|s| Some((s.id.clone(), Record::from_stored(s)?)))
            .collect())
    }

    /// Every unexpired record of `owner`'s, newest first.
    pub async fn of_client(&self, owner: &str) -> Result<Vec<StoredObject>, StoreError> {
        self.store.client_objects(owner, unix_now()).await
    }

    /// Deletes expired records; run now and then.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        self.store.purge_objects(unix_now()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(owner: &str) -> Record {
        Record {
            kind: Kind::File,
            node: Arc::from("a"),
            owner: Arc::from(owner),
            created_at: 10,
            expires_at: None,
        }
    }

    /// N10: when two clients' answers carry the same id, the first owner
    /// keeps it, in the cache as in the store, whichever was sighted last.
    #[tokio::test]
    async fn a_records_owner_never_changes_in_the_cache_either() {
        let url = secrecy::SecretString::from("sqlite::memory:");
        let store = Store::open(&url, std::path::Path::new(".")).await.unwrap();
        let objects = Arc::new(Objects::new(
            store,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        ));
        objects.keep("file-1", record("cl_first")).await.unwrap();
        objects.keep("file-1", record("cl_second")).await.unwrap();
        let found = objects.find("file-1").await.unwrap().unwrap();
        assert_eq!(&*found.owner, "cl_first");
        // Sighted mid-stream, with the cache already holding the first.
        let tasks = Tasks::new();
        objects.keep_soon(&tasks, "file-1".to_owned(), record("cl_second"));
        tasks.stop().await;
        assert_eq!(
            &*objects.find("file-1").await.unwrap().unwrap().owner,
            "cl_first"
        );
        // And with the cache empty: the store's first record comes back.
        objects.cache.invalidate("file-1").await;
        objects.keep("file-1", record("cl_second")).await.unwrap();
        assert_eq!(
            &*objects.find("file-1").await.unwrap().unwrap().owner,
            "cl_first"
        );
    }
}
