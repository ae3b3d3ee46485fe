//! The sled backend, used the careful way: one sled tree per [`Table`], every batch one
//! multi-tree transaction, `flush()` plus an fdatasync of sled's log file before an
//! `Immediate` write returns, and `Mode::LowSpace` against sled's known appetite for disk space.
//!
//! Why the extra fdatasync: on Linux, sled 0.34's `flush()` ends with `sync_file_range`, which
//! waits for the page cache to reach the device but neither flushes the device's write cache
//! nor writes the file's metadata (its size as it grows), so a power loss could lose writes
//! `flush()` reported done. fdatasync on the same file does both.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Db, Transactional, Tree};

use super::{Backend, BackendKind, Durability, KeyRange, KeyValue, StateView, StoreError, StoreResult, Table, WriteBatch, WriteOp};

fn backend_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("sled: {error}"))
}

pub struct SledBackend {
    db: Db,
    trees: HashMap<Table, Tree>,
    path: std::path::PathBuf,
    /// sled's log file (`<path>/db`), opened again only to fdatasync it (see the module doc).
    log_file: std::fs::File,
}

impl SledBackend {
    pub fn open(path: &Path) -> StoreResult<Self> {
        let db = sled::Config::new().path(path).mode(sled::Mode::LowSpace).open().map_err(backend_error)?;
        let mut trees = HashMap::new();
        for table in Table::ALL {
            trees.insert(table, db.open_tree(table.name()).map_err(backend_error)?);
        }
        let log_file = std::fs::File::open(path.join("db"))?;
        Ok(Self { db, trees, path: path.to_path_buf(), log_file })
    }

    /// Everything written so far, durable: sled's flush, then a real fdatasync.
    fn flush_durably(&self) -> StoreResult<()> {
        self.db.flush().map_err(backend_error)?;
        self.log_file.sync_data()?;
        Ok(())
    }

    fn tree(&self, table: Table) -> &Tree {
        &self.trees[&table]
    }

    fn keys_in(&self, table: Table, range: &KeyRange) -> StoreResult<Vec<sled::IVec>> {
        self.tree(table).range::<Vec<u8>, _>(range.clone()).keys().collect::<Result<Vec<_>, _>>().map_err(backend_error)
    }
}

type TableChanges = Vec<(Table, Vec<(Vec<u8>, Option<Vec<u8>>)>)>;

/// The position of `table`'s change list, added if new.
fn slot(per_table: &mut TableChanges, table: Table) -> usize {
    match per_table.iter().position(|(t, _)| *t == table) {
        Some(index) => index,
        None => {
            per_table.push((table, Vec::new()));
            per_table.len() - 1
        }
    }
}

fn scan_tree(tree: &Tree, range: &KeyRange, limit: usize, reverse: bool) -> StoreResult<Vec<KeyValue>> {
    let iter = tree.range::<Vec<u8>, _>(range.clone());
    let convert =
        |item: sled::Result<(sled::IVec, sled::IVec)>| item.map(|(key, value)| (key.to_vec(), value.to_vec())).map_err(backend_error);
    if reverse { iter.rev().take(limit).map(convert).collect() } else { iter.take(limit).map(convert).collect() }
}

impl Backend for SledBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sled
    }

    fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.tree(table).get(key).map_err(backend_error)?.map(|value| value.to_vec()))
    }

    fn scan(&self, table: Table, range: KeyRange, limit: usize, reverse: bool) -> StoreResult<Vec<KeyValue>> {
        scan_tree(self.tree(table), &range, limit, reverse)
    }

    fn write(&self, batch: WriteBatch, durability: Durability) -> StoreResult<()> {
        // sled transactions cannot delete ranges, so ranges and clears are turned into key
        // deletes first. The state machine is the only writer of the tables it clears, and the
        // log store the only writer of the log, so no key can appear in between.
        let mut per_table: TableChanges = Vec::new();
        for op in batch.ops {
            match op {
                WriteOp::Put { table, key, value } => {
                    let index = slot(&mut per_table, table);
                    per_table[index].1.push((key, Some(value)));
                }
                WriteOp::Delete { table, key } => {
                    let index = slot(&mut per_table, table);
                    per_table[index].1.push((key, None));
                }
                WriteOp::DeleteRange { table, start, end } => {
                    let range = (Bound::Included(start), end.map_or(Bound::Unbounded, Bound::Excluded));
                    let keys = self.keys_in(table, &range)?;
                    let index = slot(&mut per_table, table);
                    per_table[index].1.extend(keys.into_iter().map(|key| (key.to_vec(), None)));
                }
                WriteOp::Clear { table } => {
                    let keys = self.keys_in(table, &super::full_range())?;
                    let index = slot(&mut per_table, table);
                    per_table[index].1.extend(keys.into_iter().map(|key| (key.to_vec(), None)));
                }
            }
        }
        if per_table.len() == 1 {
            // A single tree: sled's batch is atomic on its own and cheaper than a transaction.
            let (table, changes) = per_table.pop().expect("one table");
            let mut sled_batch = sled::Batch::default();
            for (key, value) in changes {
                match value {
                    Some(value) => sled_batch.insert(key, value),
                    None => sled_batch.remove(key),
                }
            }
            self.tree(table).apply_batch(sled_batch).map_err(backend_error)?;
        } else if !per_table.is_empty() {
            let trees: Vec<&Tree> = per_table.iter().map(|(table, _)| self.tree(*table)).collect();
            trees
                .as_slice()
                .transaction(|transactional_trees| {
                    for (tree, (_, changes)) in transactional_trees.iter().zip(per_table.iter()) {
                        for (key, value) in changes {
                            match value {
                                Some(value) => {
                                    tree.insert(key.as_slice(), value.as_slice())?;
                                }
                                None => {
                                    tree.remove(key.as_slice())?;
                                }
                            }
                        }
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .map_err(|error: TransactionError<()>| backend_error(format!("{error:?}")))?;
        }
        if durability == Durability::Immediate {
            self.flush_durably()?;
        }
        Ok(())
    }

    fn sync(&self) -> StoreResult<()> {
        self.flush_durably()
    }

    fn state_view(&self) -> StoreResult<Box<dyn StateView>> {
        // sled has no read snapshots across trees, so the view is copied while the caller holds
        // the state machine (nothing is applied meanwhile).
        let mut tables = HashMap::new();
        for table in Table::state_tables() {
            tables.insert(table, scan_tree(self.tree(table), &super::full_range(), usize::MAX, false)?);
        }
        Ok(Box::new(CopiedStateView { tables }))
    }

    fn disk_bytes(&self) -> u64 {
        directory_size(&self.path)
    }
}

fn directory_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => directory_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

struct CopiedStateView {
    tables: HashMap<Table, Vec<KeyValue>>,
}

impl StateView for CopiedStateView {
    fn dump(&self, table: Table) -> StoreResult<Vec<KeyValue>> {
        Ok(self.tables.get(&table).cloned().unwrap_or_default())
    }
}
