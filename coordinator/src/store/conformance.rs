//! The same behaviour asked of every backend.

use std::ops::Bound;

use super::*;

fn run_conformance(backend: &dyn Backend) {
    let mut batch = WriteBatch::new();
    for index in 0u64..20 {
        batch.put(Table::RaftLog, index.to_be_bytes(), format!("entry-{index}"));
    }
    batch.put(Table::Users, b"alice".to_vec(), b"1".to_vec());
    backend.write(batch, Durability::Immediate).unwrap();

    assert_eq!(backend.get(Table::RaftLog, &3u64.to_be_bytes()).unwrap().unwrap(), b"entry-3");
    assert_eq!(backend.get(Table::Users, b"alice").unwrap().unwrap(), b"1");
    assert!(backend.get(Table::Users, b"bob").unwrap().is_none());
    // Tables are separate namespaces.
    assert!(backend.get(Table::Pipelines, b"alice").unwrap().is_none());

    let range = (Bound::Included(5u64.to_be_bytes().to_vec()), Bound::Excluded(8u64.to_be_bytes().to_vec()));
    let rows = backend.scan(Table::RaftLog, range, usize::MAX, false).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].1, b"entry-5");
    let last = backend.scan(Table::RaftLog, full_range(), 2, true).unwrap();
    assert_eq!(last.iter().map(|row| row.1.clone()).collect::<Vec<_>>(), vec![b"entry-19".to_vec(), b"entry-18".to_vec()]);

    let mut batch = WriteBatch::new();
    batch.delete_range(Table::RaftLog, 15u64.to_be_bytes(), None);
    batch.delete_range(Table::RaftLog, 0u64.to_be_bytes(), Some(3u64.to_be_bytes().to_vec()));
    batch.delete(Table::Users, b"alice".to_vec());
    backend.write(batch, Durability::Deferred).unwrap();
    let rows = backend.scan(Table::RaftLog, full_range(), usize::MAX, false).unwrap();
    assert_eq!(rows.first().unwrap().1, b"entry-3");
    assert_eq!(rows.last().unwrap().1, b"entry-14");
    assert_eq!(rows.len(), 12);
    assert!(backend.get(Table::Users, b"alice").unwrap().is_none());

    // A view is a point in time.
    let mut batch = WriteBatch::new();
    batch.put(Table::Configurations, b"a".to_vec(), b"1".to_vec());
    backend.write(batch, Durability::Immediate).unwrap();
    let view = backend.state_view().unwrap();
    let mut batch = WriteBatch::new();
    batch.put(Table::Configurations, b"b".to_vec(), b"2".to_vec());
    batch.clear(Table::Indexes);
    backend.write(batch, Durability::Immediate).unwrap();
    assert_eq!(view.dump(Table::Configurations).unwrap().len(), 1);
    assert_eq!(backend.scan(Table::Configurations, prefix_range(b""), usize::MAX, false).unwrap().len(), 2);

    let mut batch = WriteBatch::new();
    batch.clear(Table::Configurations);
    backend.write(batch, Durability::Immediate).unwrap();
    assert!(backend.scan(Table::Configurations, full_range(), usize::MAX, false).unwrap().is_empty());
}

#[test]
fn redb_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open_backend(BackendKind::Redb, dir.path()).unwrap();
    run_conformance(backend.as_ref());
}

#[test]
fn sled_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open_backend(BackendKind::Sled, dir.path()).unwrap();
    run_conformance(backend.as_ref());
}

#[test]
fn reopen_keeps_immediate_writes() {
    for kind in [BackendKind::Redb, BackendKind::Sled] {
        let dir = tempfile::tempdir().unwrap();
        {
            let backend = open_backend(kind, dir.path()).unwrap();
            let mut batch = WriteBatch::new();
            batch.put(Table::RaftMeta, b"vote".to_vec(), b"v".to_vec());
            backend.write(batch, Durability::Immediate).unwrap();
        }
        let backend = open_backend(kind, dir.path()).unwrap();
        assert_eq!(backend.get(Table::RaftMeta, b"vote").unwrap().unwrap(), b"v", "{kind}");
    }
}

#[test]
fn prefix_successor_handles_trailing_max_bytes() {
    assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
    assert_eq!(prefix_successor(&[1, 255]), Some(vec![2]));
    assert_eq!(prefix_successor(&[255, 255]), None);
}
