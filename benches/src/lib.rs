//! Shared pieces of Davit's benchmarks (the binaries under `src/`): [`harness`] starts real
//! processes and writes RESULTS.md; [`sim_agent`] speaks the agent protocol for load.

pub mod harness;
pub mod sim_agent;
