//! Turning source-control events into runs: the one entry point webhooks and the poller call.
//! It converts parsed events into the replicated `ScmChange`s (the only place that conversion
//! lives) and proposes one `Command::RecordScmChanges`; de-duplication and pipeline matching
//! happen in `apply` (`state/scm.rs`), so every replica decides alike. It never reads payloads
//! or the network itself.

use std::collections::BTreeMap;

use serde::Serialize;

use super::events::{PullRequestAction, ScmEvent};
use crate::api_error::ApiError;
use crate::node::{Node, Requester};
use crate::state::command::{ScmChange, ScmPullRequestAction, ScmReport};
use crate::state::txn::StateRead;
use crate::state::{Command, ScmSource};
use crate::store::StoreResult;

impl From<PullRequestAction> for ScmPullRequestAction {
    fn from(action: PullRequestAction) -> Self {
        match action {
            PullRequestAction::Opened => ScmPullRequestAction::Opened,
            PullRequestAction::Synchronized => ScmPullRequestAction::Synchronized,
            PullRequestAction::Reopened => ScmPullRequestAction::Reopened,
            PullRequestAction::Closed => ScmPullRequestAction::Closed,
            PullRequestAction::Merged => ScmPullRequestAction::Merged,
        }
    }
}

impl From<&ScmEvent> for ScmChange {
    fn from(event: &ScmEvent) -> Self {
        match event {
            ScmEvent::Push(push) => ScmChange::Push { branch: push.branch.clone(), before: push.before.clone(), after: push.after.clone() },
            ScmEvent::TagPush(tag) => ScmChange::Tag { tag: tag.tag.clone(), commit: tag.commit.clone() },
            ScmEvent::PullRequest(pull) => ScmChange::PullRequest {
                number: pull.number,
                action: pull.action.into(),
                source_branch: pull.source_branch.clone(),
                target_branch: pull.target_branch.clone(),
                head_commit: pull.head_commit.clone(),
                merge_ref: pull.merge_ref.clone(),
            },
        }
    }
}

/// What one submission did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Triggered {
    /// The webhook delivery id was already seen in the last 72 hours: nothing ran.
    pub duplicate: bool,
    /// Every deployment (run) created, in order.
    pub deployments: Vec<u64>,
    /// One entry per submitted event, in order (empty for a duplicate).
    pub changes: Vec<TriggeredChange>,
    /// Deployments in the preview environments of closed pull requests that were cancelled.
    pub cancelled_deployments: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TriggeredChange {
    pub deployments: Vec<u64>,
    /// Why the change started nothing, or why some pipelines did not run.
    pub skipped: Vec<String>,
}

impl From<ScmReport> for Triggered {
    fn from(report: ScmReport) -> Self {
        Triggered {
            duplicate: report.duplicate,
            deployments: report.deployments(),
            cancelled_deployments: report.cancelled_deployments,
            changes: report
                .changes
                .into_iter()
                .map(|change| TriggeredChange { deployments: change.deployments, skipped: change.skipped })
                .collect(),
        }
    }
}

/// Record `events` of repository `repo_id` as seen by `source`, through Raft (one write), and
/// return what ran. A webhook's delivery id seen in the last 72 hours makes the whole
/// submission a duplicate; a branch or tag already recorded at the same commit runs nothing
/// (which is what keeps a commit seen by both a webhook and the poller from running twice).
/// Answers once this node has applied the write, so the deployments can be read back here.
pub async fn submit(
    node: &Node,
    requester: &Requester,
    repo_id: u64,
    source: ScmSource,
    events: Vec<ScmEvent>,
) -> Result<Triggered, ApiError> {
    let changes: Vec<ScmChange> = events.iter().map(ScmChange::from).collect();
    let (outcome, _) = crate::api::propose(node, requester, Command::RecordScmChanges { repo_id, source, changes }).await?;
    let applied = outcome.result.map_err(ApiError::from)?;
    Ok(applied.scm.map(Triggered::from).unwrap_or_default())
}

/// The last commit recorded per ref (`refs/heads/main`, `refs/tags/v1`) of a repository, read
/// from this node's applied state (no read barrier: the poller compares and lets `apply` decide).
pub fn known_heads(state: &dyn StateRead, repo_id: u64) -> StoreResult<BTreeMap<String, String>> {
    crate::state::scm::known_heads(state, repo_id)
}
