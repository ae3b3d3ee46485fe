//! Source-control changes in the replicated state: `Command::RecordScmChanges` turns pushes, tag
//! pushes and pull request changes into deployments. It owns three small tables in `StateMeta`:
//! webhook delivery ids (kept 72 hours, for de-duplication of redeliveries), the last head seen
//! per ref of each repository ("known heads", which is what makes a commit seen both by a webhook
//! and by the poller run once), and the last head built per pull request. Like all of `apply`, it
//! never reads the clock: "now" is the proposal's time.

use std::collections::BTreeMap;

use super::apply::{Checkout, NewDeployment, create_deployment, index, index_ids, load, load_id, not_found, store};
use super::apply::{cancel_deployment_jobs, set_deployment_status};
use super::codec::{id_key, key_id};
use super::command::{Outcome, Proposal, RejectionCode, ScmChange, ScmChangeReport, ScmPullRequestAction, ScmReport, ScmSource};
use super::records::{Deployment, DeploymentStatus, Environment, Pipeline, PreviewOwner, Repository, ScmOrigin, Timestamp, TriggerEvent};
use super::txn::{StateRead, Txn};
use crate::scm::glob::branch_matches;
use crate::store::{StoreResult, Table};

/// How long a webhook delivery id is remembered: a provider's redelivery (manual or automatic)
/// within this window is acknowledged and ignored.
pub const DELIVERY_RETENTION_MS: i64 = 72 * 60 * 60 * 1000;

/// At most this many expired delivery ids are removed per command, so that one apply never does
/// work proportional to the whole table (the rest go with the next commands).
pub const DELIVERY_PRUNE_PER_APPLY: usize = 64;

/// Delivery ids are GUIDs (36 characters); anything much longer is not one.
pub const MAX_DELIVERY_ID_BYTES: usize = 200;

/// A Bitbucket push can carry several changes; a command with more than this is refused.
pub const MAX_CHANGES_PER_COMMAND: usize = 1000;

const DELIVERY_PREFIX: &[u8] = b"scm/delivery/";
const DELIVERY_BY_TIME_PREFIX: &[u8] = b"scm/delivery_by_time/";
const HEAD_PREFIX: &[u8] = b"scm/head/";
const PULL_REQUEST_HEAD_PREFIX: &[u8] = b"scm/pull_request_head/";

fn delivery_key(repo_id: u64, delivery: &str) -> Vec<u8> {
    [DELIVERY_PREFIX, &id_key(repo_id), delivery.as_bytes()].concat()
}

/// Ordered by time first, so that pruning reads only the oldest entries.
fn delivery_by_time_key(seen_at: Timestamp, repo_id: u64, delivery: &str) -> Vec<u8> {
    [DELIVERY_BY_TIME_PREFIX, &(seen_at.max(0) as u64).to_be_bytes(), &id_key(repo_id), delivery.as_bytes()].concat()
}

fn head_prefix(repo_id: u64) -> Vec<u8> {
    [HEAD_PREFIX, &id_key(repo_id)].concat()
}

fn head_key(repo_id: u64, git_ref: &str) -> Vec<u8> {
    [&head_prefix(repo_id), git_ref.as_bytes()].concat()
}

fn pull_request_head_key(repo_id: u64, number: u64) -> Vec<u8> {
    [PULL_REQUEST_HEAD_PREFIX, &id_key(repo_id), &id_key(number)].concat()
}

/// The last commit recorded for each ref of a repository (`refs/heads/main` -> commit id), as
/// every accepted push, tag push and poll left it. The poller compares `git ls-remote` with this.
pub fn known_heads(state: &dyn StateRead, repo_id: u64) -> StoreResult<BTreeMap<String, String>> {
    let prefix = head_prefix(repo_id);
    let mut heads = BTreeMap::new();
    for (key, value) in state.scan_prefix(Table::StateMeta, &prefix)? {
        let git_ref = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        heads.insert(git_ref, super::codec::decode::<String>(Table::StateMeta, &value)?);
    }
    Ok(heads)
}

/// When a webhook delivery id of the repository was recorded, if it still is.
pub fn delivery_seen_at(state: &dyn StateRead, repo_id: u64, delivery: &str) -> StoreResult<Option<Timestamp>> {
    load(state, Table::StateMeta, &delivery_key(repo_id, delivery))
}

/// The name of a pull request's preview environment.
pub fn preview_environment_name(pull_request: u64) -> String {
    format!("pr-{pull_request}")
}

/// Drop what is kept about a repository that is being deleted: its known heads and pull request
/// heads. Its delivery ids expire by themselves. Returns the rows deleted.
pub(super) fn forget_repository(txn: &mut Txn, repo_id: u64) -> StoreResult<u64> {
    let mut deleted = 0;
    for prefix in [head_prefix(repo_id), [PULL_REQUEST_HEAD_PREFIX, &id_key(repo_id)].concat()] {
        for (key, _) in txn.scan_prefix(Table::StateMeta, &prefix)? {
            txn.delete(Table::StateMeta, key);
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Remove delivery ids recorded `DELIVERY_RETENTION_MS` or longer before `now`, oldest first, at
/// most [`DELIVERY_PRUNE_PER_APPLY`] of them.
fn prune_deliveries(txn: &mut Txn, now: Timestamp) -> StoreResult<u64> {
    let mut pruned = 0;
    for (key, _) in txn.scan_prefix_first(Table::StateMeta, DELIVERY_BY_TIME_PREFIX, DELIVERY_PRUNE_PER_APPLY)? {
        let rest = &key[DELIVERY_BY_TIME_PREFIX.len()..];
        let Some(seen_at) = rest.get(..8).map(|bytes| u64::from_be_bytes(bytes.try_into().expect("8 bytes")) as i64) else { break };
        if now - seen_at < DELIVERY_RETENTION_MS {
            break;
        }
        let Some(repo_id) = rest.get(8..16).and_then(key_id) else { break };
        let delivery = String::from_utf8_lossy(&rest[16..]).into_owned();
        txn.delete(Table::StateMeta, delivery_key(repo_id, &delivery));
        txn.delete(Table::StateMeta, key);
        pruned += 1;
    }
    Ok(pruned)
}

/// Two commit ids name the same commit: equal, or one an abbreviation (7+ digits) of the other
/// (Bitbucket abbreviates in some payloads; the poller sees full ids).
fn same_commit(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    let (short, long) = if a.len() <= b.len() { (&a, &b) } else { (&b, &a) };
    short == long || (short.len() >= 7 && long.starts_with(short.as_str()))
}

/// Apply `Command::RecordScmChanges`.
pub(super) fn record_changes(
    txn: &mut Txn,
    proposal: &Proposal,
    repo_id: u64,
    source: &ScmSource,
    changes: &[ScmChange],
) -> StoreResult<Outcome> {
    let now = proposal.time;
    if changes.len() > MAX_CHANGES_PER_COMMAND {
        return Ok(Outcome::rejected(
            RejectionCode::Invalid,
            format!("{} changes in one command; at most {MAX_CHANGES_PER_COMMAND}", changes.len()),
        ));
    }
    let delivery = match source {
        ScmSource::Webhook { delivery } => delivery.as_deref().filter(|delivery| !delivery.is_empty()),
        ScmSource::Poll { .. } => None,
    };
    if let Some(delivery) = delivery
        && (delivery.len() > MAX_DELIVERY_ID_BYTES || delivery.chars().any(char::is_control))
    {
        return Ok(Outcome::rejected(
            RejectionCode::Invalid,
            format!("a delivery id has at most {MAX_DELIVERY_ID_BYTES} bytes and no control characters"),
        ));
    }
    let Some(repository) = load_id::<Repository>(txn, Table::Repositories, repo_id)? else {
        return Ok(not_found("repository", repo_id));
    };
    let mut affected = prune_deliveries(txn, now)?;
    if let Some(delivery) = delivery {
        let seen_at = delivery_seen_at(txn, repo_id, delivery)?;
        if let Some(seen_at) = seen_at {
            if now - seen_at < DELIVERY_RETENTION_MS {
                return Ok(with_report(affected, ScmReport { duplicate: true, ..ScmReport::default() }));
            }
            // Expired but not pruned yet: it counts as new, and its old time goes.
            txn.delete(Table::StateMeta, delivery_by_time_key(seen_at, repo_id, delivery));
        }
        store(txn, Table::StateMeta, delivery_key(repo_id, delivery), &now);
        txn.put(Table::StateMeta, delivery_by_time_key(now, repo_id, delivery), Vec::new());
        affected += 1;
    }
    let mut pipelines = Vec::new();
    for pipeline_id in index_ids(txn, index::PIPELINES_BY_REPO, &repo_id.to_string())? {
        if let Some(pipeline) = load_id::<Pipeline>(txn, Table::Pipelines, pipeline_id)?
            && pipeline.is_active
        {
            pipelines.push(pipeline);
        }
    }
    let mut trigger =
        Trigger { proposal, repository: &repository, source, delivery, pipelines: &pipelines, affected, report: ScmReport::default() };
    for change in changes {
        let change_report = trigger.change(txn, change)?;
        trigger.report.changes.push(change_report);
    }
    Ok(with_report(trigger.affected, trigger.report))
}

fn with_report(affected: u64, report: ScmReport) -> Outcome {
    let mut outcome = Outcome::applied(None, affected);
    if let Ok(applied) = &mut outcome.result {
        applied.scm = Some(report);
    }
    outcome
}

/// One command's work: the repository, its active pipelines, and what was done so far.
struct Trigger<'a> {
    proposal: &'a Proposal,
    repository: &'a Repository,
    source: &'a ScmSource,
    delivery: Option<&'a str>,
    pipelines: &'a [Pipeline],
    affected: u64,
    report: ScmReport,
}

impl Trigger<'_> {
    fn baseline(&self) -> bool {
        matches!(self.source, ScmSource::Poll { baseline: true })
    }

    fn change(&mut self, txn: &mut Txn, change: &ScmChange) -> StoreResult<ScmChangeReport> {
        match change {
            ScmChange::Push { branch, after, .. } => {
                let git_ref = format!("refs/heads/{branch}");
                self.ref_moved(txn, TriggerEvent::Push, &git_ref, Some(branch), after)
            }
            ScmChange::Tag { tag, commit } => {
                let git_ref = format!("refs/tags/{tag}");
                self.ref_moved(txn, TriggerEvent::Tag, &git_ref, None, commit)
            }
            ScmChange::PullRequest { number, action, target_branch, source_branch, head_commit, merge_ref } => {
                if self.baseline() {
                    return Ok(skipped("a baseline poll records heads and runs nothing"));
                }
                if !action.runs_checks() {
                    return self.pull_request_ended(txn, *number, *action);
                }
                let Some(head_commit) = head_commit.as_deref() else {
                    return Ok(skipped(format!("pull request #{number} names no head commit")));
                };
                let head_key = pull_request_head_key(self.repository.repo_id, *number);
                if *action == ScmPullRequestAction::Synchronized
                    && load::<String>(txn, Table::StateMeta, &head_key)?.is_some_and(|built| same_commit(&built, head_commit))
                {
                    return Ok(skipped(format!("pull request #{number} is still at {head_commit}, which already ran")));
                }
                store(txn, Table::StateMeta, head_key, &head_commit.to_string());
                self.affected += 1;
                let origin_ref = merge_ref.clone().unwrap_or_else(|| format!("refs/heads/{source_branch}"));
                let run = Run {
                    event: TriggerEvent::PullRequest,
                    git_ref: origin_ref,
                    commit: head_commit.to_string(),
                    branch: Some(source_branch.clone()),
                    fetch_ref: merge_ref.clone(),
                    pull_request: Some(*number),
                };
                self.run_matching(txn, Some(target_branch), run)
            }
        }
    }

    /// A branch or tag moved to `commit`: record the head, then run what matches unless the
    /// commit was already seen on that ref (by a webhook or a poll) or this is a baseline.
    fn ref_moved(
        &mut self,
        txn: &mut Txn,
        event: TriggerEvent,
        git_ref: &str,
        branch: Option<&String>,
        commit: &str,
    ) -> StoreResult<ScmChangeReport> {
        let key = head_key(self.repository.repo_id, git_ref);
        if let Some(known) = load::<String>(txn, Table::StateMeta, &key)?
            && same_commit(&known, commit)
        {
            return Ok(skipped(format!("{git_ref} is already at {known}; that commit was seen before")));
        }
        store(txn, Table::StateMeta, key, &commit.to_string());
        self.affected += 1;
        if self.baseline() {
            return Ok(skipped(format!("baseline: recorded {git_ref} at {commit}; a baseline poll runs nothing")));
        }
        let run = Run {
            event,
            git_ref: git_ref.to_string(),
            commit: commit.to_string(),
            branch: branch.cloned(),
            fetch_ref: None,
            pull_request: None,
        };
        self.run_matching(txn, branch.map(String::as_str), run)
    }

    /// Create one deployment per active pipeline that matches: its branch pattern (the
    /// repository's branch when it has none) matches `branch` — the pushed branch, or a pull
    /// request's target — and it runs on the event. Tags belong to no branch: every pipeline
    /// that runs on tags runs for any tag.
    fn run_matching(&mut self, txn: &mut Txn, branch: Option<&str>, run: Run) -> StoreResult<ScmChangeReport> {
        let mut report = ScmChangeReport::default();
        let mut branch_matched = false;
        for pipeline in self.pipelines {
            let pattern = pipeline.branch.as_deref().unwrap_or(&self.repository.branch);
            if let Some(branch) = branch
                && !branch_matches(pattern, branch)
            {
                continue;
            }
            branch_matched = true;
            if !pipeline.build.triggers_on(run.event) {
                report.skipped.push(format!(
                    "pipeline {} ({}) does not run on {} events; add {:?} to its trigger_events",
                    pipeline.pipeline_id,
                    pipeline.name,
                    run.event.as_str(),
                    run.event.as_str()
                ));
                continue;
            }
            let environment = match run.pull_request {
                Some(number) if pipeline.build.preview_environments => {
                    let name = preview_environment_name(number);
                    if name.len() > 20 {
                        report.skipped.push(format!("pull request #{number} is too large a number for an environment name"));
                        continue;
                    }
                    self.open_preview(txn, &name, pipeline.pipeline_id, number)?;
                    name
                }
                _ => pipeline.environment.clone(),
            };
            let origin = ScmOrigin {
                repo_id: self.repository.repo_id,
                source: self.source.name().to_string(),
                event: run.event.as_str().to_string(),
                git_ref: run.git_ref.clone(),
                head_commit: run.commit.clone(),
                pull_request: run.pull_request,
                delivery: self.delivery.map(str::to_string),
            };
            let new = NewDeployment {
                commit_hash: run.commit.clone(),
                environment,
                config_overrides: BTreeMap::new(),
                rollback_of: None,
                scm: Some(origin),
                checkout: Checkout { branch: run.branch.clone(), fetch_ref: run.fetch_ref.clone() },
            };
            let (deployment_id, written) = create_deployment(txn, self.proposal, pipeline, new)?;
            self.affected += written;
            report.deployments.push(deployment_id);
        }
        if !branch_matched {
            let what = match (run.event, branch) {
                (TriggerEvent::PullRequest, Some(branch)) => format!("pull requests into {branch}"),
                (_, Some(branch)) => format!("branch {branch}"),
                (_, None) => "tags".to_string(),
            };
            report.skipped.push(format!("no active pipeline of repository {} builds {what}", self.repository.repo_id));
        }
        Ok(report)
    }

    /// Record that `pipeline_id`'s preview for pull request `number` lives in `name`.
    fn open_preview(&mut self, txn: &mut Txn, name: &str, pipeline_id: u64, number: u64) -> StoreResult<()> {
        let now = self.proposal.time;
        let owner = PreviewOwner { repo_id: self.repository.repo_id, pipeline_id, pull_request: number };
        let mut environment = load::<Environment>(txn, Table::Environments, name.as_bytes())?.unwrap_or_else(|| Environment {
            name: name.to_string(),
            previews: Vec::new(),
            created_at: now,
            updated_at: now,
        });
        if !environment.previews.contains(&owner) {
            environment.previews.push(owner);
            environment.updated_at = now;
            store(txn, Table::Environments, name.as_bytes().to_vec(), &environment);
            self.affected += 1;
        }
        Ok(())
    }

    /// A pull request was closed or merged: nothing runs; its preview environment goes, with the
    /// deployments still running there.
    fn pull_request_ended(&mut self, txn: &mut Txn, number: u64, action: ScmPullRequestAction) -> StoreResult<ScmChangeReport> {
        let now = self.proposal.time;
        let repo_id = self.repository.repo_id;
        let verb = if action == ScmPullRequestAction::Merged { "merged" } else { "closed" };
        let mut report = skipped(format!("pull request #{number} was {verb}; closing starts no runs"));
        txn.delete(Table::StateMeta, pull_request_head_key(repo_id, number));
        let name = preview_environment_name(number);
        let Some(mut environment) = load::<Environment>(txn, Table::Environments, name.as_bytes())? else {
            return Ok(report);
        };
        let (ended, kept): (Vec<PreviewOwner>, Vec<PreviewOwner>) =
            environment.previews.into_iter().partition(|owner| owner.repo_id == repo_id && owner.pull_request == number);
        if ended.is_empty() {
            return Ok(report);
        }
        let reason = format!("preview environment {name} removed: pull request #{number} was {verb}");
        for owner in &ended {
            for deployment_id in index_ids(txn, index::DEPLOYMENTS_BY_PIPELINE, &owner.pipeline_id.to_string())? {
                let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else { continue };
                if deployment.environment != name || deployment.status.is_final() {
                    continue;
                }
                set_deployment_status(txn, &mut deployment, DeploymentStatus::Failed, Some(reason.clone()), now);
                self.affected += 1 + cancel_deployment_jobs(txn, deployment_id, &reason, now)?;
                self.report.cancelled_deployments.push(deployment_id);
            }
        }
        if kept.is_empty() {
            txn.delete(Table::Environments, name.as_bytes().to_vec());
            report.skipped.push(format!("preview environment {name} deleted"));
        } else {
            environment.previews = kept;
            environment.updated_at = now;
            store(txn, Table::Environments, name.as_bytes().to_vec(), &environment);
        }
        self.affected += 1;
        Ok(report)
    }
}

/// A run to start on every matching pipeline.
struct Run {
    event: TriggerEvent,
    /// The ref the origin records.
    git_ref: String,
    commit: String,
    branch: Option<String>,
    fetch_ref: Option<String>,
    pull_request: Option<u64>,
}

fn skipped(reason: impl Into<String>) -> ScmChangeReport {
    ScmChangeReport { deployments: Vec::new(), skipped: vec![reason.into()] }
}
