//! Source control: what GitHub, GitLab and Bitbucket tell us about a repository, turned into
//! plain data. Everything here is pure (no network, store or clock) so that it can be tested
//! on fixtures and fuzzed; the API layer authenticates deliveries and acts on the result.

pub mod events;
pub mod glob;
pub mod status;
pub mod trigger;

#[cfg(test)]
mod tests;
