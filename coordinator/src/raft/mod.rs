//! The Raft layer: openraft's type configuration, our log store and state machine over the
//! storage trait, and the tonic transport between coordinators.

// openraft's own error types (`StorageError`, `RPCError`) are large by design and its traits
// return them; boxing them here would only add allocations at the boundary.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod service;
pub mod snapshot;
pub mod state_machine;

#[cfg(test)]
mod conformance;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Outcome, Proposal};

/// What every coordinator knows about another: where to reach it and where it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DavitNode {
    /// host:port of the node's gRPC listener (Raft, forwarding, agents).
    pub grpc_addr: String,
    /// host:port of the node's HTTP listener (REST, dashboard, metrics).
    pub http_addr: String,
    #[serde(default)]
    pub region: String,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Proposal,
        R = Outcome,
        NodeId = u64,
        Node = DavitNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, DavitNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, DavitNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, DavitNode>;

pub(crate) fn storage_io_error(
    make: impl FnOnce(openraft::AnyError) -> openraft::StorageIOError<NodeId>,
    error: impl std::error::Error + 'static,
) -> StorageError {
    StorageError::IO { source: make(openraft::AnyError::new(&error)) }
}
