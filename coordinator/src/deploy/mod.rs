//! Deployments of a built release to an environment's hosts. `plan.rs` is the pure planner the
//! deployment controller asks for its next actions.

pub mod controller;
pub mod plan;
