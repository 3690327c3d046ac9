//! The ledger: what each client used (requests, tokens, bytes), by model
//! and UTC day, written to the store in batches off the request path. (The
//! rate windows are [`crate::limits`]'; the tokens one answer used are
//! [`crate::meter`]'s.)
//!
//! A request hands its [`Entry`] to the [`Ledger`] (a channel send: no
//! lock, no wait) when its relay ends. The [`LedgerWriter`] task adds
//! entries up in memory and writes them in one transaction every
//! `store.usage_flush_interval`, and whenever the admin API asks
//! ([`Ledger::flush`]), so a usage report includes every request that has
//! ended.
//!
//! Nothing is lost on a graceful stop: the writer runs until the server has
//! drained, then takes what is left in the channel and writes it. A write
//! that failed to reach the store keeps its batch for the next one; memory
//! stays bounded by the number of (client, model, day) entries, not by
//! requests. A batch the store refuses for its data is written row by row,
//! and a row the store refuses on its own is dropped, logged and counted
//! ([`dropped`](Ledger::dropped)): one bad row never holds up the others,
//! nor is it retried for ever.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError, UsageRow, UsageTotals};

/// One request's usage.
#[derive(Debug, Clone)]
pub struct Entry {
    pub client_id: Arc<str>,
    /// Empty for requests that name no model.
    pub model: String,
    pub totals: UsageTotals,
}

enum Command {
    Record(Entry),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// The request path's end of the ledger's channel.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Command>,
    /// Rows the store refused, since start.
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Record(r) => f.debug_tuple("Record").field(r).finish(),
            Command::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Ledger {
    /// Usage rows the store refused and that were dropped, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Hands a request's usage to the writer; never waits.
    pub fn record(&self, record: Entry) {
        if self.tx.send(Command::Record(record)).is_err() {
            tracing::error!("usage writer has stopped; a request's usage was not recorded");
        }
    }

    /// Writes everything recorded so far, and waits until it is stored.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (done, written) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .map_err(|_| StoreError::Failed("the usage writer has stopped".to_owned()))?;
        written
            .await
            .map_err(|_| StoreError::Failed("the usage writer has stopped".to_owned()))?
            .map_err(StoreError::Failed)
    }
}

type Key = (Arc<str>, String, String);

/// The task that writes usage to the store.
pub struct LedgerWriter {
    rx: mpsc::UnboundedReceiver<Command>,
    pending: HashMap<Key, UsageTotals>,
    dropped: Arc<AtomicU64>,
}

/// A recorder and the writer that empties it.
pub fn channel() -> (Ledger, LedgerWriter) {
    let (tx, rx) = mpsc::unbounded_channel();
    let dropped = Arc::new(AtomicU64::new(0));
    (
        Ledger {
            tx,
            dropped: Arc::clone(&dropped),
        },
        LedgerWriter {
            rx,
            pending: HashMap::new(),
            dropped,
        },
    )
}

/// Attempts at the last write on shutdown before usage is given up (logged).
const FINAL_WRITE_ATTEMPTS: u32 = 3;

impl LedgerWriter {
    /// Writes batches every `interval` until `cancel`, then writes the rest.
    pub async fn run(mut self, store: Store, interval: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.rx.recv() => match command {
                    Some(Command::Record(record)) => self.add(record),
                    Some(Command::Flush(done)) => {
                        // Records sent before the flush request are in the channel ahead of it.
                        let result = self.write(&store).await.map_err(|e| e.to_string());
                        let _ = done.send(result);
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if let Err(err) = self.write(&store).await {
                        tracing::warn!(error = %err, entries = self.pending.len(), "usage not written yet; will retry");
                    }
                }
                () = cancel.cancelled() => break,
            }
        }
        // The server has drained: take what is left and write it.
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            match command {
                Command::Record(record) => self.add(record),
                Command::Flush(done) => {
                    let _ = done.send(Err("the gateway is shutting down".to_owned()));
                }
            }
        }
        for attempt in 1..=FINAL_WRITE_ATTEMPTS {
            match self.write(&store).await {
                Ok(()) => return,
                Err(err) if attempt == FINAL_WRITE_ATTEMPTS => {
                    tracing::error!(error = %err, entries = self.pending.len(), "usage lost at shutdown: the store refused the last batch");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "writing the last usage batch failed; retrying")
                }
            }
        }
    }

    fn add(&mut self, record: Entry) {
        let key = (record.client_id, record.model, utc_day(SystemTime::now()));
        *self.pending.entry(key).or_default() += record.totals;
    }

    async fn write(&mut self, store: &Store) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch: Vec<UsageRow> = self
            .pending
            .iter()
            .map(|((client_id, model, day), totals)| UsageRow {
                client_id: client_id.to_string(),
                model: model.clone(),
                day: day.clone(),
                totals: *totals,
            })
            .collect();
        match store.add_usage(&batch).await {
            Ok(()) => {
                self.pending.clear();
                Ok(())
            }
            Err(StoreError::Rejected(_)) => self.write_each(store, batch).await,
            Err(err) => Err(err),
        }
    }

    /// The store refused a batch for its data: each row alone, dropping
    /// (and counting) those it refuses. Each row leaves the pending set
    /// once written or dropped, so a failure to reach the store midway
    /// writes nothing twice.
    async fn write_each(&mut self, store: &Store, batch: Vec<UsageRow>) -> Result<(), StoreError> {
        for row in batch {
            match store.add_usage(std::slice::from_ref(&row)).await {
                Ok(()) => {}
                Err(StoreError::Rejected(why)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(client = %row.client_id, day = %row.day, error = %why, "usage row refused by the store; dropped");
                }
                Err(err) => return Err(err),
            }
            let key = (Arc::from(row.client_id.as_str()), row.model, row.day);
            self.pending.remove(&key);
        }
        Ok(())
    }
}

/// `YYYY-MM-DD` in UTC.
pub fn utc_day(at: SystemTime) -> String {
    let mut day = humantime::format_rfc3339_seconds(at).to_string();
    day.truncate(10);
    day
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_the_utc_date() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 365 + 3_600 * 23);
        assert_eq!(utc_day(at), "1971-01-01");
    }
}
