//! Davit's agent: the worker that runs on every VM of the fleet. It never links coordinator
//! code; it talks to coordinators only through the protocols in `davit-proto`.

pub use davit_proto;

pub mod client;
pub mod config;
pub mod executor;
pub mod git;
pub mod job_spec;
pub mod jobs;
pub mod log_levels;
pub mod log_shipping;
pub mod masking;
pub mod packing;
pub mod release;
pub mod resource_usage;
pub mod runtime;
pub mod upload;
