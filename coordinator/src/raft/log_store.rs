//! The Raft log, vote and committed index over the storage trait.
//!
//! One writer thread makes every change to the log tables, in the order openraft asks for them.
//! `append` puts the entries in an in-memory cache (readable at once, as openraft requires) and
//! queues them; it never waits for the disk, so the Raft core goes on accepting proposals and
//! replicating while a sync is in flight. The writer takes everything queued since its last
//! commit and writes it as one durable (fsynced) transaction, and only then completes the
//! `LogFlushed` callbacks. So an entry is acknowledged to openraft (and from there to leaders and
//! clients) only once it is on disk, and all the appends that arrive during one sync share the
//! next one (group commit).
//!
//! **Invariant:** a `LogFlushed` callback, a truncation and a vote complete only after the
//! transaction holding them is durable. The writer publishes the end of the durable log
//! ([`LogStore::durable_log_end`]); the state machine applies an entry only once it is durable
//! here, so applied state never becomes durable ahead of the log it came from.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader, StorageIOError};
use tokio::sync::{oneshot, watch};

use super::{Entry, LogId, StorageError, TypeConfig, Vote, storage_io_error};
use crate::state::codec::{decode, encode, key_id};
use crate::store::{Backend, Durability, StoreError, Table, WriteBatch, WriteOp};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Durable entries kept in memory after they are written, so that replication to a follower a
/// little behind reads memory rather than decoding them from the database again. Entries not yet
/// durable are always kept, whatever their number.
const CACHED_DURABLE_ENTRIES: usize = 4096;

#[derive(Clone)]
pub struct LogStore {
    backend: Arc<dyn Backend>,
    memory: Arc<Mutex<InMemory>>,
    writer: mpsc::Sender<WriterOp>,
    durable_log_end: watch::Receiver<u64>,
    /// The last committed log index openraft told us about (openraft 0.9's metrics do not
    /// carry it), for status and metrics.
    committed_index: Arc<std::sync::atomic::AtomicU64>,
}

/// What readers must see before the writer has stored it.
#[derive(Default)]
struct InMemory {
    /// The tail of the log: every entry not yet durable, and the most recent durable ones.
    cache: BTreeMap<u64, CachedEntry>,
    /// Set once the vote, the committed id or the purge point changes after start-up; until
    /// then the database holds the current value.
    vote: Option<Vote>,
    committed: Option<Option<LogId>>,
    last_purged: Option<LogId>,
}

struct CachedEntry {
    entry: Entry,
    durable: bool,
}

/// One change for the writer thread, in openraft's order.
enum WriterOp {
    Append { entries: Vec<Entry>, callback: LogFlushed<TypeConfig> },
    Truncate { since: u64, done: oneshot::Sender<Result<(), String>> },
    Purge { upto: LogId },
    SaveVote { vote: Vote, done: oneshot::Sender<Result<(), String>> },
    SaveCommitted { committed: Option<LogId> },
}

fn lock(memory: &Mutex<InMemory>) -> MutexGuard<'_, InMemory> {
    // The cache holds no invariant a panicking holder could half-update in a harmful way (every
    // change is one insert or one split), so a poisoned lock is still usable.
    memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LogStore {
    pub fn new(backend: Arc<dyn Backend>) -> Result<Self, StorageError> {
        // The durable log ends after the last stored entry, or after the purge point when the
        // log is empty; the state machine may apply anything before that at once.
        let last_stored = backend
            .scan(Table::RaftLog, crate::store::full_range(), 1, true)
            .map_err(|e| storage_io_error(StorageIOError::read_logs, e))?
            .first()
            .and_then(|(key, _)| key_id(key));
        let last_purged: Option<LogId> = read_meta(backend.as_ref(), LAST_PURGED)?.flatten();
        let durable_log_end = last_stored.max(last_purged.map(|id| id.index)).map_or(0, |index| index + 1);

        let (durable_sender, durable_log_end) = watch::channel(durable_log_end);
        let (writer, ops) = mpsc::channel::<WriterOp>();
        let memory = Arc::new(Mutex::new(InMemory::default()));
        let writer_backend = backend.clone();
        let writer_memory = memory.clone();
        let start_end = *durable_log_end.borrow();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(writer_backend, ops, writer_memory, durable_sender, start_end))
            .map_err(|e| storage_io_error(StorageIOError::write_logs, e))?;
        let committed: Option<LogId> = read_meta::<Option<LogId>>(backend.as_ref(), COMMITTED)?.flatten();
        let committed_index = Arc::new(std::sync::atomic::AtomicU64::new(committed.map_or(0, |id| id.index)));
        Ok(Self { backend, memory, writer, durable_log_end, committed_index })
    }

    /// One past the last durable log index (0 when the log is empty). The state machine waits on
    /// it before applying.
    /// The committed index as last saved by openraft (shared: it follows later commits).
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.committed_index.clone()
    }

    pub fn durable_log_end(&self) -> watch::Receiver<u64> {
        self.durable_log_end.clone()
    }

    fn send(&self, op: WriterOp) -> Result<(), StorageError> {
        self.writer
            .send(op)
            .map_err(|_| storage_io_error(StorageIOError::write_logs, std::io::Error::other("the raft log writer stopped after an error")))
    }
}

fn read_meta<T: serde::de::DeserializeOwned>(backend: &dyn Backend, key: &[u8]) -> Result<Option<T>, StorageError> {
    let bytes = backend.get(Table::RaftMeta, key).map_err(|e| storage_io_error(StorageIOError::read, e))?;
    bytes.map(|bytes| decode(Table::RaftMeta, &bytes)).transpose().map_err(|e| storage_io_error(StorageIOError::read, e))
}

async fn wait_done(done: oneshot::Receiver<Result<(), String>>) -> Result<(), std::io::Error> {
    match done.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(std::io::Error::other(message)),
        Err(_) => Err(std::io::Error::other("the raft log writer stopped after an error")),
    }
}

/// The writer thread: drain the queue, write it as one transaction, then complete what waited.
fn write_loop(
    backend: Arc<dyn Backend>,
    ops: mpsc::Receiver<WriterOp>,
    memory: Arc<Mutex<InMemory>>,
    durable_sender: watch::Sender<u64>,
    mut log_end: u64,
) {
    // The committed id waits for the next transaction that is written anyway, rather than
    // costing one of its own after every commit.
    let mut unwritten_committed: Option<Option<LogId>> = None;
    while let Ok(first) = ops.recv() {
        let mut batch = WriteBatch::new();
        let mut callbacks = Vec::new();
        let mut done = Vec::new();
        let mut written: Vec<LogId> = Vec::new();
        for op in std::iter::once(first).chain(ops.try_iter()) {
            match op {
                WriterOp::Append { entries, callback } => {
                    for entry in &entries {
                        batch.put(Table::RaftLog, log_key(entry.log_id.index).to_vec(), encode(entry));
                        written.push(entry.log_id);
                    }
                    if let Some(last) = entries.last() {
                        log_end = last.log_id.index + 1;
                    }
                    callbacks.push(callback);
                }
                WriterOp::Truncate { since, done: sender } => {
                    // Drop the puts this batch would delete again, so that no backend has to
                    // see its own batch's puts when it resolves the range (sled does not).
                    drop_log_puts(&mut batch, |index| index >= since);
                    written.retain(|id| id.index < since);
                    batch.delete_range(Table::RaftLog, log_key(since).to_vec(), None);
                    log_end = log_end.min(since);
                    done.push(sender);
                }
                WriterOp::Purge { upto } => {
                    drop_log_puts(&mut batch, |index| index <= upto.index);
                    written.retain(|id| id.index > upto.index);
                    batch.put(Table::RaftMeta, LAST_PURGED.to_vec(), encode(&Some(upto)));
                    batch.delete_range(Table::RaftLog, log_key(0).to_vec(), Some(log_key(upto.index + 1).to_vec()));
                    log_end = log_end.max(upto.index + 1);
                }
                WriterOp::SaveVote { vote, done: sender } => {
                    batch.put(Table::RaftMeta, VOTE.to_vec(), encode(&vote));
                    done.push(sender);
                }
                WriterOp::SaveCommitted { committed } => unwritten_committed = Some(committed),
            }
        }
        if batch.is_empty() && callbacks.is_empty() && done.is_empty() {
            continue;
        }
        if let Some(committed) = unwritten_committed.take() {
            batch.put(Table::RaftMeta, COMMITTED.to_vec(), encode(&committed));
        }

        // The committed id and the purge point may be lost in a crash (openraft re-learns the
        // one, and a purge is redone after the next snapshot), so a batch of only those does
        // not pay for a sync; it becomes durable with the next one.
        let must_sync = !callbacks.is_empty() || !done.is_empty();
        let durability = if must_sync { Durability::Immediate } else { Durability::Deferred };
        let result = backend.write(batch, durability);
        if result.is_ok() && must_sync {
            metrics::histogram!("davit_raft_log_flush_batch").record(callbacks.len() as f64);
            mark_durable(&memory, &written);
            durable_sender.send_replace(log_end);
        }
        let failed = result.as_ref().err().map(StoreError::to_string);
        for callback in callbacks {
            callback.log_io_completed(match &failed {
                None => Ok(()),
                Some(message) => Err(std::io::Error::other(message.clone())),
            });
        }
        for sender in done {
            let _ = sender.send(failed.clone().map_or(Ok(()), Err));
        }
        if let Some(message) = failed {
            // openraft stops on the failed callback; writing on after a failed transaction
            // could leave a hole in the log. Dropping the receiver fails every later append.
            tracing::error!(error = %message, "raft log write failed; the log writer stops");
            return;
        }
    }
}

fn drop_log_puts(batch: &mut WriteBatch, dropped: impl Fn(u64) -> bool) {
    batch.ops.retain(|op| match op {
        WriteOp::Put { table: Table::RaftLog, key, .. } => !key_id(key).is_some_and(&dropped),
        _ => true,
    });
}

/// Mark what this batch wrote as durable (if the cache still holds those very entries) and let
/// the cache shrink back to its size, oldest durable entries first.
fn mark_durable(memory: &Mutex<InMemory>, written: &[LogId]) {
    let mut memory = lock(memory);
    for log_id in written {
        if let Some(cached) = memory.cache.get_mut(&log_id.index)
            && cached.entry.log_id == *log_id
        {
            cached.durable = true;
        }
    }
    while memory.cache.len() > CACHED_DURABLE_ENTRIES {
        match memory.cache.first_entry() {
            Some(oldest) if oldest.get().durable => {
                oldest.remove();
            }
            _ => break,
        }
    }
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// `range` as `[start, end)`, `end = None` meaning unbounded.
fn index_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(index) => *index,
        Bound::Excluded(index) => index.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(index) => Some(index.saturating_add(1)),
        Bound::Excluded(index) => Some(*index),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = index_bounds(&range);
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        // Everything below the cache's first entry is durable in the database: it was either
        // written before start-up or evicted only once durable.
        let (cached, first_cached) = {
            let memory = lock(&self.memory);
            let cached: Vec<Entry> = memory.cache.range(range).map(|(_, cached)| cached.entry.clone()).collect();
            (cached, memory.cache.keys().next().copied())
        };
        let database_end = match (end, first_cached) {
            (Some(end), Some(first)) => Some(end.min(first)),
            (None, first) => first,
            (end, None) => end,
        };
        if database_end.is_some_and(|database_end| database_end <= start) {
            return Ok(cached);
        }
        let keys = (
            Bound::Included(log_key(start).to_vec()),
            database_end.map_or(Bound::Unbounded, |database_end| Bound::Excluded(log_key(database_end).to_vec())),
        );
        let rows =
            self.backend.scan(Table::RaftLog, keys, usize::MAX, false).map_err(|e| storage_io_error(StorageIOError::read_logs, e))?;
        let mut entries = rows
            .into_iter()
            .map(|(_, bytes)| decode(Table::RaftLog, &bytes).map_err(|e| storage_io_error(StorageIOError::read_logs, e)))
            .collect::<Result<Vec<Entry>, _>>()?;
        entries.extend(cached);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let (cached_last, purged_in_memory) = {
            let memory = lock(&self.memory);
            (memory.cache.last_key_value().map(|(_, cached)| cached.entry.log_id), memory.last_purged)
        };
        let last_purged_log_id = match purged_in_memory {
            Some(purged) => Some(purged),
            None => read_meta::<Option<LogId>>(self.backend.as_ref(), LAST_PURGED)?.flatten(),
        };
        // The cache always holds the tail of the log once anything was appended after start-up.
        let last_log_id = match cached_last {
            Some(last) => Some(last),
            None => {
                let last = self
                    .backend
                    .scan(Table::RaftLog, crate::store::full_range(), 1, true)
                    .map_err(|e| storage_io_error(StorageIOError::read_logs, e))?;
                match last.first() {
                    Some((_, bytes)) => {
                        let entry: Entry = decode(Table::RaftLog, bytes).map_err(|e| storage_io_error(StorageIOError::read_logs, e))?;
                        Some(*entry.get_log_id())
                    }
                    None => None,
                }
            }
        };
        // A purge is written after the call returns, so the database may still hold entries at
        // or below the purge point.
        let last_log_id = last_log_id.max(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        lock(&self.memory).vote = Some(*vote);
        let (done, wait) = oneshot::channel();
        self.send(WriterOp::SaveVote { vote: *vote, done })?;
        wait_done(wait).await.map_err(|e| storage_io_error(StorageIOError::write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        if let Some(vote) = lock(&self.memory).vote {
            return Ok(Some(vote));
        }
        read_meta(self.backend.as_ref(), VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Deferred: it is written with the next log write, and losing it in a crash only means
        // openraft re-learns the commit index from the leader instead of re-applying at
        // start-up.
        lock(&self.memory).committed = Some(committed);
        self.committed_index.store(committed.map_or(0, |id| id.index), std::sync::atomic::Ordering::Relaxed);
        self.send(WriterOp::SaveCommitted { committed })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        if let Some(committed) = lock(&self.memory).committed {
            return Ok(committed);
        }
        Ok(read_meta::<Option<LogId>>(self.backend.as_ref(), COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut memory = lock(&self.memory);
            for entry in &entries {
                memory.cache.insert(entry.log_id.index, CachedEntry { entry: entry.clone(), durable: false });
            }
        }
        metrics::histogram!("davit_raft_append_batch").record(entries.len() as f64);
        self.send(WriterOp::Append { entries, callback })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.memory).cache.split_off(&log_id.index);
        let (done, wait) = oneshot::channel();
        self.send(WriterOp::Truncate { since: log_id.index, done })?;
        wait_done(wait).await.map_err(|e| storage_io_error(StorageIOError::write_logs, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut memory = lock(&self.memory);
            memory.last_purged = Some(log_id);
            memory.cache = memory.cache.split_off(&(log_id.index + 1));
        }
        self.send(WriterOp::Purge { upto: log_id })
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{blank_ent, log_id};

    use super::*;
    use crate::store::{BackendKind, open_backend};

    #[test]
    fn a_truncation_or_purge_drops_the_puts_it_would_delete() {
        let mut batch = WriteBatch::new();
        for index in 0..6 {
            batch.put(Table::RaftLog, log_key(index).to_vec(), vec![1]);
        }
        batch.put(Table::RaftMeta, VOTE.to_vec(), vec![2]);
        drop_log_puts(&mut batch, |index| index >= 4);
        drop_log_puts(&mut batch, |index| index <= 1);
        let kept: Vec<Option<u64>> = batch
            .ops
            .iter()
            .map(|op| match op {
                WriteOp::Put { table: Table::RaftLog, key, .. } => key_id(key),
                _ => None,
            })
            .collect();
        assert_eq!(kept, [Some(2), Some(3), None]);
    }

    #[test]
    fn ranges_become_half_open_index_bounds() {
        assert_eq!(index_bounds(&(3..7)), (3, Some(7)));
        assert_eq!(index_bounds(&(3..=7)), (3, Some(8)));
        assert_eq!(index_bounds(&(3..)), (3, None));
        assert_eq!(index_bounds(&(..)), (0, None));
        assert_eq!(index_bounds(&(Bound::Excluded(3), Bound::Excluded(4))), (4, Some(4)));
    }

    /// Everything the writer thread does reaches the database, in openraft's order, and a store
    /// opened later on the same database starts from it (the vote, the truncated and purged log,
    /// the committed id and the end of the durable log).
    #[tokio::test]
    async fn writes_reach_the_database_in_order() {
        for kind in [BackendKind::Redb, BackendKind::Sled] {
            let directory = tempfile::tempdir().unwrap();
            let backend = open_backend(kind, &directory.path().join("store")).unwrap();
            // Entries 0..10, as if appended before a restart.
            let mut batch = WriteBatch::new();
            for index in 0..10 {
                batch.put(Table::RaftLog, log_key(index).to_vec(), encode(&blank_ent::<TypeConfig>(1, 1, index)));
            }
            backend.write(batch, Durability::Immediate).unwrap();

            let mut store = LogStore::new(backend.clone()).unwrap();
            assert_eq!(*store.durable_log_end().borrow(), 10, "{kind}");
            store.truncate(log_id(1, 1, 7)).await.unwrap();
            assert_eq!(*store.durable_log_end().borrow(), 7, "{kind}: a truncation shortens the durable log");
            store.purge(log_id(1, 1, 2)).await.unwrap();
            store.save_committed(Some(log_id(1, 1, 5))).await.unwrap();
            assert_eq!(store.committed_index().load(std::sync::atomic::Ordering::Relaxed), 5, "{kind}");
            // The vote is awaited, and the writer keeps the order, so everything before it is
            // written once it returns.
            store.save_vote(&Vote::new(2, 1)).await.unwrap();
            let indexes: Vec<u64> = store.try_get_log_entries(3..100).await.unwrap().iter().map(|entry| entry.log_id.index).collect();
            assert_eq!(indexes, [3, 4, 5, 6], "{kind}");
            drop(store);

            let mut reopened = LogStore::new(backend).unwrap();
            assert_eq!(reopened.read_vote().await.unwrap(), Some(Vote::new(2, 1)), "{kind}");
            assert_eq!(reopened.read_committed().await.unwrap(), Some(log_id(1, 1, 5)), "{kind}");
            assert_eq!(
                reopened.committed_index().load(std::sync::atomic::Ordering::Relaxed),
                5,
                "{kind}: the committed index survives a restart"
            );
            let state = reopened.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 2)), "{kind}");
            assert_eq!(state.last_log_id, Some(log_id(1, 1, 6)), "{kind}");
            assert_eq!(*reopened.durable_log_end().borrow(), 7, "{kind}");
            let indexes: Vec<u64> = reopened.try_get_log_entries(0..100).await.unwrap().iter().map(|entry| entry.log_id.index).collect();
            assert_eq!(indexes, [3, 4, 5, 6], "{kind}");
        }
    }
}
