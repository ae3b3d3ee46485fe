//! A write overlay over the stored state. `apply` reads and writes through a [`Txn`]; the
//! state machine turns the collected writes into one atomic [`WriteBatch`]. A command that is
//! rejected halfway leaves no trace because its writes live in a child overlay that is dropped.

use std::collections::BTreeMap;

use crate::store::{Backend, KeyValue, StoreResult, Table, WriteBatch, prefix_range};

pub trait StateRead {
    fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Every key/value whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> StoreResult<Vec<KeyValue>>;
    /// The first `limit` key/values whose key starts with `prefix`, in key order: for work that
    /// must stay bounded whatever the table's size (pruning in `apply`).
    fn scan_prefix_first(&self, table: Table, prefix: &[u8], limit: usize) -> StoreResult<Vec<KeyValue>> {
        let mut rows = self.scan_prefix(table, prefix)?;
        rows.truncate(limit);
        Ok(rows)
    }
}

/// Reads straight from a backend.
pub struct BackendRead<'a>(pub &'a dyn Backend);

impl StateRead for BackendRead<'_> {
    fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.0.get(table, key)
    }
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> StoreResult<Vec<KeyValue>> {
        self.0.scan(table, prefix_range(prefix), usize::MAX, false)
    }
    fn scan_prefix_first(&self, table: Table, prefix: &[u8], limit: usize) -> StoreResult<Vec<KeyValue>> {
        self.0.scan(table, prefix_range(prefix), limit, false)
    }
}

/// An empty state, for tests and for the first apply on a new node.
pub struct EmptyState;

impl StateRead for EmptyState {
    fn get(&self, _: Table, _: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(None)
    }
    fn scan_prefix(&self, _: Table, _: &[u8]) -> StoreResult<Vec<KeyValue>> {
        Ok(Vec::new())
    }
}

pub type Writes = BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>;

pub struct Txn<'a> {
    base: &'a dyn StateRead,
    writes: Writes,
}

impl<'a> Txn<'a> {
    pub fn new(base: &'a dyn StateRead) -> Self {
        Self { base, writes: BTreeMap::new() }
    }

    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.writes.insert((table, key.into()), Some(value));
    }

    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.writes.insert((table, key.into()), None);
    }

    /// Take over the writes of a child overlay that succeeded.
    pub fn absorb(&mut self, writes: Writes) {
        self.writes.extend(writes);
    }

    pub fn into_writes(self) -> Writes {
        self.writes
    }

    pub fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for ((table, key), value) in self.writes {
            match value {
                Some(value) => batch.put(table, key, value),
                None => batch.delete(table, key),
            }
        }
        batch
    }
}

impl StateRead for Txn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        match self.writes.get(&(table, key.to_vec())) {
            Some(value) => Ok(value.clone()),
            None => self.base.get(table, key),
        }
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> StoreResult<Vec<KeyValue>> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.base.scan_prefix(table, prefix)?.into_iter().collect();
        let start = (table, prefix.to_vec());
        for ((write_table, key), value) in self.writes.range(start..) {
            if *write_table != table || !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn scan_prefix_first(&self, table: Table, prefix: &[u8], limit: usize) -> StoreResult<Vec<KeyValue>> {
        // The overlay can hide at most as many base rows as it deletes under the prefix, so the
        // base's first `limit + deletions` rows hold every base row of the merged first `limit`.
        let start = (table, prefix.to_vec());
        let in_prefix =
            || self.writes.range(start.clone()..).take_while(|((write_table, key), _)| *write_table == table && key.starts_with(prefix));
        let deletions = in_prefix().filter(|(_, value)| value.is_none()).count();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.base.scan_prefix_first(table, prefix, limit.saturating_add(deletions))?.into_iter().collect();
        for ((_, key), value) in in_prefix() {
            match value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_reads_its_own_writes_and_hides_deletes() {
        let mut parent = Txn::new(&EmptyState);
        parent.put(Table::Users, b"a1".to_vec(), b"x".to_vec());
        parent.put(Table::Users, b"a2".to_vec(), b"y".to_vec());
        parent.put(Table::Users, b"b1".to_vec(), b"z".to_vec());
        let writes = {
            let mut child = Txn::new(&parent);
            child.delete(Table::Users, b"a1".to_vec());
            child.put(Table::Users, b"a3".to_vec(), b"w".to_vec());
            let rows = child.scan_prefix(Table::Users, b"a").unwrap();
            assert_eq!(rows, vec![(b"a2".to_vec(), b"y".to_vec()), (b"a3".to_vec(), b"w".to_vec())]);
            assert_eq!(child.get(Table::Users, b"a1").unwrap(), None);
            child.into_writes()
        };
        parent.absorb(writes);
        assert_eq!(parent.scan_prefix(Table::Users, b"").unwrap().len(), 3);
        let child = {
            let mut child = Txn::new(&parent);
            child.delete(Table::Users, b"a2".to_vec());
            child.put(Table::Users, b"a0".to_vec(), b"v".to_vec());
            child.into_writes()
        };
        let mut over = Txn::new(&parent);
        over.absorb(child);
        let first_two = over.scan_prefix_first(Table::Users, b"a", 2).unwrap();
        assert_eq!(first_two, vec![(b"a0".to_vec(), b"v".to_vec()), (b"a3".to_vec(), b"w".to_vec())]);
        assert_eq!(over.scan_prefix_first(Table::Users, b"a", 2).unwrap(), over.scan_prefix(Table::Users, b"a").unwrap()[..2]);
        assert!(parent.scan_prefix(Table::Pipelines, b"").unwrap().is_empty());
    }
}
