//! The redb backend: one database file, one redb table per [`Table`], every batch one write
//! transaction. redb commits are crash-safe by design (copy-on-write pages and a
//! checksummed commit slot), which is why it is the default.

use std::ops::Bound;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, BackendKind, Durability, KeyRange, KeyValue, StateView, StoreError, StoreResult, Table, WriteBatch, WriteOp};

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

fn backend_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("redb: {error}"))
}

pub struct RedbBackend {
    database: Database,
    path: std::path::PathBuf,
}

impl RedbBackend {
    pub fn open(path: &Path) -> StoreResult<Self> {
        let database = Database::create(path).map_err(backend_error)?;
        // Create every table up front so that readers never see "table does not exist".
        let transaction = database.begin_write().map_err(backend_error)?;
        for table in Table::ALL {
            transaction.open_table(definition(table)).map_err(backend_error)?;
        }
        transaction.commit().map_err(backend_error)?;
        Ok(Self { database, path: path.to_path_buf() })
    }
}

fn to_redb_bound(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key.as_slice()),
        Bound::Excluded(key) => Bound::Excluded(key.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn to_redb_bounds(range: &KeyRange) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (to_redb_bound(&range.0), to_redb_bound(&range.1))
}

fn scan_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    range: &KeyRange,
    limit: usize,
    reverse: bool,
) -> StoreResult<Vec<KeyValue>> {
    let iter = table.range::<&[u8]>(to_redb_bounds(range)).map_err(backend_error)?;
    if reverse { iter.rev().take(limit).map(to_pair).collect() } else { iter.take(limit).map(to_pair).collect() }
}

type RangeItem<'a> = Result<(redb::AccessGuard<'a, &'static [u8]>, redb::AccessGuard<'a, &'static [u8]>), redb::StorageError>;

fn to_pair(item: RangeItem<'_>) -> StoreResult<KeyValue> {
    let (key, value) = item.map_err(backend_error)?;
    Ok((key.value().to_vec(), value.value().to_vec()))
}

impl Backend for RedbBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Redb
    }

    fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let transaction = self.database.begin_read().map_err(backend_error)?;
        let table = transaction.open_table(definition(table)).map_err(backend_error)?;
        Ok(table.get(key).map_err(backend_error)?.map(|value| value.value().to_vec()))
    }

    fn scan(&self, table: Table, range: KeyRange, limit: usize, reverse: bool) -> StoreResult<Vec<KeyValue>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let transaction = self.database.begin_read().map_err(backend_error)?;
        let table = transaction.open_table(definition(table)).map_err(backend_error)?;
        scan_table(&table, &range, limit, reverse)
    }

    fn write(&self, batch: WriteBatch, durability: Durability) -> StoreResult<()> {
        let mut transaction = self.database.begin_write().map_err(backend_error)?;
        transaction
            .set_durability(match durability {
                Durability::Immediate => redb::Durability::Immediate,
                Durability::Deferred => redb::Durability::None,
            })
            .map_err(backend_error)?;
        for op in &batch.ops {
            match op {
                WriteOp::Put { table, key, value } => {
                    let mut table = transaction.open_table(definition(*table)).map_err(backend_error)?;
                    table.insert(key.as_slice(), value.as_slice()).map_err(backend_error)?;
                }
                WriteOp::Delete { table, key } => {
                    let mut table = transaction.open_table(definition(*table)).map_err(backend_error)?;
                    table.remove(key.as_slice()).map_err(backend_error)?;
                }
                WriteOp::DeleteRange { table, start, end } => {
                    let mut table = transaction.open_table(definition(*table)).map_err(backend_error)?;
                    let range: KeyRange = (Bound::Included(start.clone()), end.clone().map_or(Bound::Unbounded, Bound::Excluded));
                    table.retain_in::<&[u8], _>(to_redb_bounds(&range), |_, _| false).map_err(backend_error)?;
                }
                WriteOp::Clear { table } => {
                    let mut table = transaction.open_table(definition(*table)).map_err(backend_error)?;
                    table.retain(|_, _| false).map_err(backend_error)?;
                }
            }
        }
        transaction.commit().map_err(backend_error)?;
        Ok(())
    }

    fn sync(&self) -> StoreResult<()> {
        // An empty transaction committed with `Immediate` durability persists every
        // `Durability::None` commit before it.
        let mut transaction = self.database.begin_write().map_err(backend_error)?;
        transaction.set_durability(redb::Durability::Immediate).map_err(backend_error)?;
        transaction.commit().map_err(backend_error)
    }

    fn state_view(&self) -> StoreResult<Box<dyn StateView>> {
        let transaction = self.database.begin_read().map_err(backend_error)?;
        Ok(Box::new(RedbStateView { transaction }))
    }

    fn disk_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|meta| meta.len()).unwrap_or(0)
    }
}

/// A redb read transaction: MVCC, so it sees one commit while writers go on.
struct RedbStateView {
    transaction: redb::ReadTransaction,
}

impl StateView for RedbStateView {
    fn dump(&self, table: Table) -> StoreResult<Vec<KeyValue>> {
        let table = self.transaction.open_table(definition(table)).map_err(backend_error)?;
        scan_table(&table, &super::full_range(), usize::MAX, false)
    }
}
