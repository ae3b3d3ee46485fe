//! The replicated state: records (one per table of the data model), the typed commands that
//! change them, and `apply`, the pure function the Raft state machine runs on every replica.

pub mod apply;
pub mod codec;
pub mod command;
pub mod config_history;
pub mod environments;
pub mod events;
pub mod progress;
pub mod records;
pub mod rollout;
pub mod scm;
pub mod txn;

#[cfg(test)]
mod tests;

pub use apply::apply;
pub use command::{Applied, Command, ConfigEntry, Outcome, Proposal, Rejection, RejectionCode, ScmChange, ScmReport, ScmSource};
