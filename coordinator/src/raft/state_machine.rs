//! The Raft state machine over the storage trait: applies committed entries with the pure
//! `state::apply`, builds and installs snapshots.
//!
//! Applied state is written with `Durability::Deferred`: every entry it reflects is already
//! durable in the Raft log, and openraft re-applies from the saved commit index after a crash.
//! The one case the log cannot cover is entries purged after a snapshot, so at start-up a
//! snapshot newer than the applied state is installed first.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use tokio::sync::{broadcast, watch};

use super::snapshot::{self, SnapshotDir};
use super::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig, storage_io_error};
use crate::state::codec::{decode, encode};
use crate::state::events::{StateEvent, events_of};
use crate::state::txn::{BackendRead, Txn};
use crate::state::{Outcome, apply};
use crate::store::{Backend, Durability, Table, WriteBatch};

const LAST_APPLIED: &[u8] = b"last_applied";
const MEMBERSHIP: &[u8] = b"membership";

pub struct StateMachineStore {
    backend: Arc<dyn Backend>,
    snapshots: SnapshotDir,
    snapshot_counter: Arc<AtomicU64>,
    /// The last applied log index, for read-index waits and metrics.
    applied_index: watch::Sender<u64>,
    /// One past the last index durable in this node's own log (see `log_store.rs`). An entry is
    /// applied only below it: openraft may commit an entry on a quorum of other nodes before
    /// this node's log has it on disk, and applied state that reached the disk first would then
    /// be ahead of the log after a crash. `None` only in storage tests that apply without a log.
    durable_log_end: Option<watch::Receiver<u64>>,
    /// What applied commands changed, for the scheduler, agent gateways and log followers.
    /// Lossy by design (a slow receiver lags and re-reads the state).
    events: broadcast::Sender<StateEvent>,
}

impl StateMachineStore {
    pub fn open(backend: Arc<dyn Backend>, snapshots: SnapshotDir) -> Result<Self, StorageError> {
        let (applied_index, _) = watch::channel(0);
        let (events, _) = broadcast::channel(4096);
        let store =
            Self { backend, snapshots, snapshot_counter: Arc::new(AtomicU64::new(0)), applied_index, durable_log_end: None, events };
        store.recover_from_snapshot()?;
        let (last_applied, _) = store.read_applied()?;
        store.applied_index.send_replace(last_applied.map(|id| id.index).unwrap_or(0));
        Ok(store)
    }

    /// Apply entries only once this node's log has them on disk (`LogStore::durable_log_end`).
    /// `Node::start` always connects the two.
    pub fn apply_after_durable_log(mut self, durable_log_end: watch::Receiver<u64>) -> Self {
        self.durable_log_end = Some(durable_log_end);
        self
    }

    /// A sender whose receivers see every [`StateEvent`] applied on this node.
    pub fn events(&self) -> broadcast::Sender<StateEvent> {
        self.events.clone()
    }

    /// Subscribe to the applied index (used by linearizable reads on this node).
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.subscribe()
    }

    fn read_applied(&self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let read = |key: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            self.backend.get(Table::StateMeta, key).map_err(|e| storage_io_error(StorageIOError::read_state_machine, e))
        };
        let last_applied = match read(LAST_APPLIED)? {
            Some(bytes) => decode(Table::StateMeta, &bytes).map_err(|e| storage_io_error(StorageIOError::read_state_machine, e))?,
            None => None,
        };
        let membership = match read(MEMBERSHIP)? {
            Some(bytes) => decode(Table::StateMeta, &bytes).map_err(|e| storage_io_error(StorageIOError::read_state_machine, e))?,
            None => StoredMembership::default(),
        };
        Ok((last_applied, membership))
    }

    fn recover_from_snapshot(&self) -> Result<(), StorageError> {
        let Some(bytes) = self.snapshots.load_current().map_err(|e| storage_io_error(read_snapshot_none, e))? else {
            return Ok(());
        };
        let decoded = snapshot::decode(&bytes).map_err(|e| storage_io_error(read_snapshot_none, e))?;
        let (last_applied, _) = self.read_applied()?;
        if decoded.meta.last_log_id > last_applied {
            tracing::warn!(
                snapshot = ?decoded.meta.last_log_id,
                applied = ?last_applied,
                "applied state is older than the newest snapshot; installing the snapshot"
            );
            self.write_snapshot_state(&decoded)?;
        }
        Ok(())
    }

    fn write_snapshot_state(&self, decoded: &snapshot::Decoded) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        for table in Table::state_tables() {
            batch.clear(table);
        }
        for (table, key, value) in &decoded.records {
            batch.put(*table, key.clone(), value.clone());
        }
        batch.put(Table::StateMeta, LAST_APPLIED.to_vec(), encode(&decoded.meta.last_log_id));
        batch.put(Table::StateMeta, MEMBERSHIP.to_vec(), encode(&decoded.meta.last_membership));
        self.backend.write(batch, Durability::Immediate).map_err(|e| storage_io_error(StorageIOError::write_state_machine, e))?;
        self.applied_index.send_replace(decoded.meta.last_log_id.map(|id| id.index).unwrap_or(0));
        Ok(())
    }
}

fn read_snapshot_none(source: openraft::AnyError) -> StorageIOError<u64> {
    StorageIOError::read_snapshot(None, source)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let (Some(durable_log_end), Some(last)) = (&mut self.durable_log_end, entries.last()) {
            let needed = last.log_id.index + 1;
            durable_log_end.wait_for(|end| *end >= needed).await.map_err(|_| {
                storage_io_error(StorageIOError::write_state_machine, std::io::Error::other("the raft log writer stopped after an error"))
            })?;
        }
        let backend = self.backend.clone();
        type Applied = (Vec<Outcome>, Option<u64>, Vec<StateEvent>);
        let (outcomes, last_index, events) = tokio::task::spawn_blocking(move || -> Result<Applied, StorageError> {
            let base = BackendRead(backend.as_ref());
            let mut txn = Txn::new(&base);
            let mut outcomes = Vec::with_capacity(entries.len());
            let mut events = Vec::new();
            let mut last_log_id = None;
            let mut membership = None;
            for entry in &entries {
                last_log_id = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => outcomes.push(Outcome::applied(None, 0)),
                    EntryPayload::Normal(proposal) => {
                        let outcome = apply(&mut txn, proposal, entry.log_id.index)
                            .map_err(|e| storage_io_error(StorageIOError::write_state_machine, e))?;
                        events.extend(events_of(&proposal.command, &outcome));
                        outcomes.push(outcome);
                    }
                    EntryPayload::Membership(new_membership) => {
                        membership = Some(StoredMembership::new(Some(entry.log_id), new_membership.clone()));
                        outcomes.push(Outcome::applied(None, 0));
                    }
                }
            }
            let mut batch = txn.into_batch();
            if let Some(last_log_id) = last_log_id {
                batch.put(Table::StateMeta, LAST_APPLIED.to_vec(), encode(&Some(last_log_id)));
            }
            if let Some(membership) = membership {
                batch.put(Table::StateMeta, MEMBERSHIP.to_vec(), encode(&membership));
            }
            backend.write(batch, Durability::Deferred).map_err(|e| storage_io_error(StorageIOError::write_state_machine, e))?;
            Ok((outcomes, last_log_id.map(|id| id.index), events))
        })
        .await
        .expect("state machine apply panicked")?;
        if let Some(index) = last_index {
            self.applied_index.send_replace(index);
        }
        for event in events {
            // No receiver is fine: nobody waits on this node.
            let _ = self.events.send(event);
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The view is taken here, while openraft holds the state machine, so it is exactly the
        // state at the last applied entry.
        let view = self.backend.state_view();
        SnapshotBuilder {
            view: view.map_err(|error| error.to_string()),
            snapshots: self.snapshots.clone(),
            counter: self.snapshot_counter.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let bytes = data.into_inner();
        let decoded = snapshot::decode(&bytes)
            .map_err(|e| storage_io_error(|source| StorageIOError::read_snapshot(Some(meta.signature()), source), e))?;
        if decoded.meta.last_log_id != meta.last_log_id {
            return Err(storage_io_error(
                |source| StorageIOError::read_snapshot(Some(meta.signature()), source),
                std::io::Error::other("snapshot contents do not match its meta"),
            ));
        }
        self.snapshots
            .save(meta, &bytes)
            .map_err(|e| storage_io_error(|source| StorageIOError::write_snapshot(Some(meta.signature()), source), e))?;
        self.write_snapshot_state(&decoded)?;
        tracing::info!(last_log_id = ?meta.last_log_id, records = decoded.records.len(), "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let Some(bytes) = self.snapshots.load_current().map_err(|e| storage_io_error(read_snapshot_none, e))? else {
            return Ok(None);
        };
        let decoded = snapshot::decode(&bytes).map_err(|e| storage_io_error(read_snapshot_none, e))?;
        Ok(Some(Snapshot { meta: decoded.meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}

pub struct SnapshotBuilder {
    view: Result<Box<dyn crate::store::StateView>, String>,
    snapshots: SnapshotDir,
    counter: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let view =
            self.view.as_ref().map_err(|e| storage_io_error(StorageIOError::read_state_machine, std::io::Error::other(e.clone())))?;
        let mut tables = Vec::new();
        for table in Table::state_tables() {
            tables.push((table, view.dump(table).map_err(|e| storage_io_error(StorageIOError::read_state_machine, e))?));
        }
        let state_meta = &tables.iter().find(|(table, _)| *table == Table::StateMeta).expect("state meta is a state table").1;
        let find = |key: &[u8]| state_meta.iter().find(|(k, _)| k == key).map(|(_, value)| value.clone());
        let last_log_id: Option<LogId> = match find(LAST_APPLIED) {
            Some(bytes) => decode(Table::StateMeta, &bytes).map_err(|e| storage_io_error(StorageIOError::read_state_machine, e))?,
            None => None,
        };
        let last_membership: StoredMembership = match find(MEMBERSHIP) {
            Some(bytes) => decode(Table::StateMeta, &bytes).map_err(|e| storage_io_error(StorageIOError::read_state_machine, e))?,
            None => StoredMembership::default(),
        };
        let sequence = self.counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(id) => format!("{}-{}-{sequence}", id.leader_id.term, id.index),
            None => format!("0-0-{sequence}"),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        let bytes = snapshot::encode(&meta, &tables);
        let snapshots = self.snapshots.clone();
        let save_meta = meta.clone();
        let save_bytes = bytes.clone();
        tokio::task::spawn_blocking(move || snapshots.save(&save_meta, &save_bytes))
            .await
            .expect("snapshot writer panicked")
            .map_err(|e| storage_io_error(|source| StorageIOError::write_snapshot(Some(meta.signature()), source), e))?;
        metrics::counter!("davit_snapshots_built_total").increment(1);
        tracing::info!(?last_log_id, bytes = bytes.len(), "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}
