//! Source control: what GitHub, GitLab and Bitbucket tell us about a repository, turned into
//! plain data. The parsing and deciding is pure (no network, store or clock) so that it can be
//! tested on fixtures and fuzzed; the API layer authenticates deliveries and acts on the result.
//! `polling::ls_remote` is the one place that runs git, and the poller the one loop.

pub mod events;
pub mod glob;
pub mod poller;
pub mod polling;
pub mod status;
pub mod trigger;

#[cfg(test)]
mod tests;
