//! openraft's own storage conformance suite, run against both backends.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

use super::log_store::LogStore;
use super::snapshot::SnapshotDir;
use super::state_machine::StateMachineStore;
use super::{NodeId, TypeConfig};
use crate::store::{BackendKind, open_backend};

struct Builder(BackendKind);

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let backend = open_backend(self.0, &dir.path().join("store")).expect("open backend");
        let snapshots = SnapshotDir::open(&dir.path().join("snapshots")).expect("snapshot dir");
        let state_machine = StateMachineStore::open(backend.clone(), snapshots)?;
        // The state machine is not connected to the log's durability here: the suite applies
        // entries it never appended.
        Ok((dir, LogStore::new(backend)?, state_machine))
    }
}

#[test]
fn openraft_suite_redb() {
    Suite::test_all(Builder(BackendKind::Redb)).unwrap();
}

#[test]
fn openraft_suite_sled() {
    Suite::test_all(Builder(BackendKind::Sled)).unwrap();
}
