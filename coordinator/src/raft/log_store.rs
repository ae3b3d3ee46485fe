//! The Raft log, vote and committed index over the storage trait.
//!
//! Group commit: `append` writes the entries at once (visible to readers, not yet durable) and
//! hands openraft's `LogFlushed` callback to a flusher thread. The flusher makes everything
//! written so far durable with one sync and only then completes every callback it holds. So an
//! entry is acknowledged to openraft (and from there to followers' leaders and to clients) only
//! once it is on disk, and many concurrent appends share one fsync.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::mpsc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader, StorageIOError};

use super::{Entry, LogId, StorageError, TypeConfig, Vote, storage_io_error};
use crate::state::codec::{decode, encode};
use crate::store::{Backend, Durability, Table, WriteBatch};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    backend: Arc<dyn Backend>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let (flusher, pending) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flusher_backend = backend.clone();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || flush_loop(flusher_backend, pending))
            .expect("spawn the log flusher thread");
        Self { backend, flusher }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let bytes = self.backend.get(Table::RaftMeta, key).map_err(|e| storage_io_error(StorageIOError::read, e))?;
        bytes.map(|bytes| decode(Table::RaftMeta, &bytes)).transpose().map_err(|e| storage_io_error(StorageIOError::read, e))
    }
}

fn flush_loop(backend: Arc<dyn Backend>, pending: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = pending.recv() {
        let mut callbacks = vec![first];
        callbacks.extend(pending.try_iter());
        let result = backend.sync().map_err(|error| std::io::Error::other(error.to_string()));
        metrics::histogram!("davit_raft_log_flush_batch").record(callbacks.len() as f64);
        for callback in callbacks {
            callback.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(error) => Err(std::io::Error::other(error.to_string())),
            });
        }
    }
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn range_to_keys<RB: RangeBounds<u64>>(range: &RB) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let map = |bound: Bound<&u64>| match bound {
        Bound::Included(index) => Bound::Included(log_key(*index).to_vec()),
        Bound::Excluded(index) => Bound::Excluded(log_key(*index).to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    };
    (map(range.start_bound()), map(range.end_bound()))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry>, StorageError> {
        let rows = self
            .backend
            .scan(Table::RaftLog, range_to_keys(&range), usize::MAX, false)
            .map_err(|e| storage_io_error(StorageIOError::read_logs, e))?;
        rows.into_iter()
            .map(|(_, bytes)| decode(Table::RaftLog, &bytes).map_err(|e| storage_io_error(StorageIOError::read_logs, e)))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED)?;
        let last = self
            .backend
            .scan(Table::RaftLog, crate::store::full_range(), 1, true)
            .map_err(|e| storage_io_error(StorageIOError::read_logs, e))?;
        let last_log_id = match last.first() {
            Some((_, bytes)) => {
                let entry: Entry = decode(Table::RaftLog, bytes).map_err(|e| storage_io_error(StorageIOError::read_logs, e))?;
                Some(*entry.get_log_id())
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.put(Table::RaftMeta, VOTE.to_vec(), encode(vote));
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.write(batch, Durability::Immediate))
            .await
            .expect("vote writer panicked")
            .map_err(|e| storage_io_error(StorageIOError::write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Deferred: losing it in a crash only means openraft re-learns the commit index from
        // the leader instead of re-applying at start-up.
        let mut batch = WriteBatch::new();
        batch.put(Table::RaftMeta, COMMITTED.to_vec(), encode(&committed));
        self.backend.write(batch, Durability::Deferred).map_err(|e| storage_io_error(StorageIOError::write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::new();
        for entry in entries {
            batch.put(Table::RaftLog, log_key(entry.get_log_id().index).to_vec(), encode(&entry));
        }
        let count = batch.ops.len();
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.write(batch, Durability::Deferred))
            .await
            .expect("log writer panicked")
            .map_err(|e| storage_io_error(StorageIOError::write_logs, e))?;
        metrics::histogram!("davit_raft_append_batch").record(count as f64);
        self.flusher.send(callback).map_err(|_| storage_io_error(StorageIOError::write_logs, std::io::Error::other("log flusher stopped")))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.delete_range(Table::RaftLog, log_key(log_id.index), None);
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.write(batch, Durability::Immediate))
            .await
            .expect("log writer panicked")
            .map_err(|e| storage_io_error(StorageIOError::write_logs, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.put(Table::RaftMeta, LAST_PURGED.to_vec(), encode(&Some(log_id)));
        batch.delete_range(Table::RaftLog, log_key(0), Some(log_key(log_id.index + 1).to_vec()));
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.write(batch, Durability::Deferred))
            .await
            .expect("log writer panicked")
            .map_err(|e| storage_io_error(StorageIOError::write_logs, e))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{CommittedLeaderId, EntryPayload, Membership};

    use super::*;
    use crate::raft::DavitNode;
    use crate::state::{Command, Proposal};

    fn sample_entries() -> Vec<Entry> {
        let log_id = |index| openraft::LogId::new(CommittedLeaderId::new(2, 1), index);
        let node = DavitNode { grpc_addr: "127.0.0.1:7701".into(), http_addr: "127.0.0.1:7700".into(), region: "a".into() };
        let membership = Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, node)]));
        vec![
            Entry { log_id: log_id(7), payload: EntryPayload::Blank },
            Entry {
                log_id: log_id(8),
                payload: EntryPayload::Normal(Proposal {
                    time: 1_764_134_400_000,
                    actor: Some(1),
                    command: Command::DeleteRepository { repo_id: 4 },
                    source: None,
                }),
            },
            Entry { log_id: log_id(9), payload: EntryPayload::Membership(membership) },
        ]
    }

    const FROZEN_BLANK: &[u8] = br#"{"log_id":{"leader_id":{"term":2,"node_id":1},"index":7},"payload":"Blank"}"#;
    const FROZEN_NORMAL: &[u8] = br#"{"log_id":{"leader_id":{"term":2,"node_id":1},"index":8},"payload":{"Normal":{"time":1764134400000,"actor":1,"command":{"type":"delete_repository","repo_id":4}}}}"#;
    const FROZEN_MEMBERSHIP: &[u8] = br#"{"log_id":{"leader_id":{"term":2,"node_id":1},"index":9},"payload":{"Membership":{"configs":[[1]],"nodes":{"1":{"grpc_addr":"127.0.0.1:7701","http_addr":"127.0.0.1:7700","region":"a"}}}}}"#;

    /// Log entries as stored by this version; they must decode forever.
    #[test]
    fn frozen_v1_log_entries_still_decode() {
        let frozen: [&[u8]; 3] = [FROZEN_BLANK, FROZEN_NORMAL, FROZEN_MEMBERSHIP];
        for (entry, json) in sample_entries().iter().zip(frozen) {
            // Format byte 1, then the JSON.
            let bytes = &[&[1u8][..], json].concat();
            let decoded: Entry = decode(Table::RaftLog, bytes).unwrap();
            assert_eq!(&decoded, entry);
            assert_eq!(&encode(entry), bytes, "the stored format of log entries changed; add a new version instead");
        }
    }
}
