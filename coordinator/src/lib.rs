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
pub mod deploy;
pub mod fleet;
pub mod grpc_api;
pub mod log_segments;
pub mod node;
pub mod observability;
pub mod outbound;
pub mod raft;
pub mod retention;
pub mod scheduler;
pub mod scm;
pub mod secrets;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
