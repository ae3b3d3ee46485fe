//! Durable storage behind one small trait, so the Raft log store and the state machine do not
//! care which embedded database holds their bytes. Two backends implement it: redb (the
//! default, see ARCHITECTURE.md for why) and sled (the client's named choice, used the careful
//! way). This module never interprets values: it stores bytes under keys in named tables.

mod redb_backend;
mod sled_backend;

#[cfg(test)]
mod conformance;

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

pub use redb_backend::RedbBackend;
use serde::{Deserialize, Serialize};
pub use sled_backend::SledBackend;

/// Every table the coordinator keeps. Adding a table is a compatible change; renaming one is not
/// (the name is what is stored on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Raft log entries, key = big-endian log index.
    RaftLog,
    /// Vote, committed log id and last purged log id.
    RaftMeta,
    /// The state machine's own bookkeeping: last applied log id, membership, id counters.
    StateMeta,
    Users,
    ApiTokens,
    Repositories,
    Pipelines,
    Deployments,
    Environments,
    Artifacts,
    Configurations,
    /// Every version of every configuration key, key = config id, version (both big-endian).
    ConfigVersions,
    Logs,
    Notifications,
    AuditLogs,
    Agents,
    Jobs,
    RegistrationTokens,
    /// Progress events of deployments, key = deployment id, sequence (both big-endian).
    DeploymentEvents,
    /// Secondary indexes of every table: key = index name, 0, indexed value, 0, primary key.
    Indexes,
}

impl Table {
    /// The tables that make up the applied state (everything a snapshot carries).
    pub fn state_tables() -> impl Iterator<Item = Table> {
        Table::ALL.into_iter().filter(|table| table.is_state())
    }

    pub const ALL: [Table; 20] = [
        Table::RaftLog,
        Table::RaftMeta,
        Table::StateMeta,
        Table::Users,
        Table::ApiTokens,
        Table::Repositories,
        Table::Pipelines,
        Table::Deployments,
        Table::Environments,
        Table::Artifacts,
        Table::Configurations,
        Table::ConfigVersions,
        Table::Logs,
        Table::Notifications,
        Table::AuditLogs,
        Table::Agents,
        Table::Jobs,
        Table::RegistrationTokens,
        Table::DeploymentEvents,
        Table::Indexes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::RaftLog => "raft_log",
            Table::RaftMeta => "raft_meta",
            Table::StateMeta => "state_meta",
            Table::Users => "users",
            Table::ApiTokens => "api_tokens",
            Table::Repositories => "repositories",
            Table::Pipelines => "pipelines",
            Table::Deployments => "deployments",
            Table::Environments => "environments",
            Table::Artifacts => "artifacts",
            Table::Configurations => "configurations",
            Table::ConfigVersions => "config_versions",
            Table::Logs => "logs",
            Table::Notifications => "notifications",
            Table::AuditLogs => "audit_logs",
            Table::Agents => "agents",
            Table::Jobs => "jobs",
            Table::RegistrationTokens => "registration_tokens",
            Table::DeploymentEvents => "deployment_events",
            Table::Indexes => "indexes",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|table| table.name() == name)
    }

    /// Tables a snapshot replaces wholesale. The Raft metadata stays with the log.
    pub fn is_state(self) -> bool {
        !matches!(self, Table::RaftLog | Table::RaftMeta)
    }
}

/// One change inside a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
    /// Delete every key in `[start, end)`; `end = None` means to the end of the table.
    DeleteRange {
        table: Table,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
    /// Delete every key of the table.
    Clear {
        table: Table,
    },
}

/// Changes applied all together or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put { table, key: key.into(), value: value.into() });
    }
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete { table, key: key.into() });
    }
    pub fn delete_range(&mut self, table: Table, start: impl Into<Vec<u8>>, end: Option<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteRange { table, start: start.into(), end });
    }
    pub fn clear(&mut self, table: Table) {
        self.ops.push(WriteOp::Clear { table });
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// How durable a write must be when [`Backend::write`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk (fsynced) before returning. Every Raft log append and vote uses this.
    Immediate,
    /// Visible to readers at once, made durable by the next `Immediate` write. The state
    /// machine uses this: everything it applies is already durable in the Raft log and is
    /// re-applied after a crash.
    Deferred,
}

/// The range argument of [`Backend::scan`].
pub type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

pub type KeyValue = (Vec<u8>, Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend error: {0}")]
    Backend(String),
    #[error("corrupt stored value in table {table}: {message}")]
    Corrupt { table: &'static str, message: String },
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A consistent, point-in-time read of the state tables, used to build a snapshot while the
/// state machine goes on applying.
pub trait StateView: Send + Sync {
    /// Every key/value of `table`, in key order.
    fn dump(&self, table: Table) -> StoreResult<Vec<KeyValue>>;
}

/// The storage trait. Implementations must make a batch atomic: after a crash either all of
/// its operations are visible or none is.
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;
    fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Key/values in `range`, in key order (reverse order when `reverse`), at most `limit`.
    fn scan(&self, table: Table, range: KeyRange, limit: usize, reverse: bool) -> StoreResult<Vec<KeyValue>>;
    fn write(&self, batch: WriteBatch, durability: Durability) -> StoreResult<()>;
    /// Make every write so far durable (one fsync for all `Deferred` writes before it).
    fn sync(&self) -> StoreResult<()>;
    /// A consistent read of the state tables (see [`StateView`]).
    fn state_view(&self) -> StoreResult<Box<dyn StateView>>;
    /// Bytes used on disk, for metrics and the benchmark's comparison.
    fn disk_bytes(&self) -> u64;
}

/// Which embedded database holds the data, chosen in the node config (`storage = "redb"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Redb,
    Sled,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Redb => "redb",
            BackendKind::Sled => "sled",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(BackendKind::Redb),
            "sled" => Ok(BackendKind::Sled),
            other => Err(format!("unknown storage backend {other:?}: use \"redb\" or \"sled\"")),
        }
    }
}

/// Open (or create) the backend of `kind` inside directory `dir`.
pub fn open_backend(kind: BackendKind, dir: &Path) -> StoreResult<Arc<dyn Backend>> {
    std::fs::create_dir_all(dir)?;
    Ok(match kind {
        BackendKind::Redb => Arc::new(RedbBackend::open(&dir.join("state.redb"))?),
        BackendKind::Sled => Arc::new(SledBackend::open(&dir.join("state.sled"))?),
    })
}

/// Helpers for range bounds over byte keys.
pub fn prefix_range(prefix: &[u8]) -> KeyRange {
    let start = Bound::Included(prefix.to_vec());
    let end = match prefix_successor(prefix) {
        Some(end) => Bound::Excluded(end),
        None => Bound::Unbounded,
    };
    (start, end)
}

/// The smallest key greater than every key that starts with `prefix`, if there is one.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub fn full_range() -> KeyRange {
    (Bound::Unbounded, Bound::Unbounded)
}
