//! Davit's coordinator: a Raft-replicated control plane. See ARCHITECTURE.md for the map.

pub mod agent_gateway;
pub mod api;
pub mod api_error;
pub mod auth;
pub mod blob_store;
pub mod cli;
pub mod cluster_service;
pub mod commit_status;
pub mod config;
pub mod dashboard;
pub mod deploy;
pub mod fleet;
pub mod grpc_api;
pub mod log_segments;
pub mod log_text_index;
pub mod node;
pub mod observability;
pub mod outbound;
/// The agent's job specs (a rollout's record holds its release settings); re-exported so that
/// the records name them through this crate, as the fuzz crate's copy of them does.
pub use davit_agent::job_spec as release_spec;
pub mod raft;
pub mod release_usage;
pub mod retention;
pub mod scheduler;
pub mod scm;
pub mod secrets;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
