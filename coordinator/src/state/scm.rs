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
use super::records::{
    Deployment, DeploymentStatus, Environment, EnvironmentSettings, Pipeline, PreviewOwner, Repository, ScmOrigin, Timestamp, TriggerEvent,
};
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

/// The pull request whose preview environment `environment` is, if it is one (`pr-<n>`).
pub fn preview_pull_request(environment: &str) -> Option<u64> {
    let digits = environment.strip_prefix("pr-")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The label value (`environment=preview`) of deploy hosts that serve every preview.
pub const PREVIEW_HOSTS: &str = "preview";

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
            let mut new = NewDeployment {
                commit_hash: run.commit.clone(),
                environment,
                config_overrides: BTreeMap::new(),
                rollback_of: None,
                release_of: None,
                scm: Some(origin),
                checkout: Checkout { branch: run.branch.clone(), fetch_ref: run.fetch_ref.clone() },
            };
            if let Err(refusal) = super::environments::admit(txn, pipeline, &mut new)? {
                report.skipped.push(format!("pipeline {}: {refusal}", pipeline.pipeline_id));
                continue;
            }
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
            settings: EnvironmentSettings::default(),
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
            // What already runs on the preview's hosts stops too.
            let retired = super::rollout::retire_service(txn, owner.pipeline_id, &name, now)?;
            if retired > 0 {
                report.skipped.push(format!("preview environment {name}: its service is retired on {retired} host(s)"));
                self.affected += retired;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::apply;
    use crate::state::command::{Applied, Command};
    use crate::state::records::{BuildSettings, DeployStrategy, Job, JobStatus, ScmType};
    use crate::state::txn::EmptyState;

    const HOUR: i64 = 60 * 60 * 1000;

    fn propose(txn: &mut Txn, time: i64, command: Command) -> Applied {
        let proposal = Proposal { time, actor: None, command, source: None };
        apply(txn, &proposal, time as u64).unwrap().result.expect("applied")
    }

    fn connect(txn: &mut Txn, url: &str) -> u64 {
        let command = Command::ConnectRepository {
            name: "repo".into(),
            repo_url: url.into(),
            branch: "main".into(),
            scm_type: ScmType::Github,
            webhook_secret: None,
            api_url: None,
            access_token: None,
            poll_interval_seconds: None,
        };
        propose(txn, 1, command).id.unwrap()
    }

    fn pipeline(txn: &mut Txn, repo_id: u64, name: &str, branch: Option<&str>, build: BuildSettings) -> u64 {
        let command = Command::CreatePipeline {
            name: name.into(),
            repo_id,
            branch: branch.map(str::to_string),
            build_command: Some("make".into()),
            deploy_strategy: DeployStrategy::Rolling,
            environment: "staging".into(),
            build,
            deploy: Default::default(),
        };
        propose(txn, 2, command).id.unwrap()
    }

    fn push(branch: &str, after: &str) -> ScmChange {
        ScmChange::Push { branch: branch.into(), before: None, after: after.into() }
    }

    fn pull_request(number: u64, action: ScmPullRequestAction, head: &str) -> ScmChange {
        ScmChange::PullRequest {
            number,
            action,
            source_branch: "feature".into(),
            target_branch: "main".into(),
            head_commit: Some(head.into()),
            merge_ref: Some(format!("refs/pull/{number}/merge")),
        }
    }

    fn webhook(delivery: &str) -> ScmSource {
        ScmSource::Webhook { delivery: Some(delivery.into()) }
    }

    fn record(txn: &mut Txn, time: i64, repo_id: u64, source: ScmSource, changes: Vec<ScmChange>) -> ScmReport {
        propose(txn, time, Command::RecordScmChanges { repo_id, source, changes }).scm.expect("a report")
    }

    fn deployment(txn: &Txn, deployment_id: u64) -> Deployment {
        load_id(txn, Table::Deployments, deployment_id).unwrap().unwrap()
    }

    fn build_job(txn: &Txn, deployment_id: u64) -> Job {
        let job_id = index_ids(txn, index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string()).unwrap()[0];
        load_id(txn, Table::Jobs, job_id).unwrap().unwrap()
    }

    #[test]
    fn a_delivery_id_is_a_duplicate_for_72_hours_then_runs_again() {
        let mut txn = Txn::new(&EmptyState);
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        let pipeline_id = pipeline(&mut txn, repo_id, "main", None, BuildSettings::default());
        let start = 1_000 * HOUR;
        let first = record(&mut txn, start, repo_id, webhook("d-1"), vec![push("main", "aaaa111")]);
        assert!(!first.duplicate);
        assert_eq!(first.deployments().len(), 1);
        assert_eq!(deployment(&txn, first.deployments()[0]).pipeline_id, pipeline_id);

        // Redelivered 71 hours later, even with other content: acknowledged, nothing runs.
        let replay = record(&mut txn, start + 71 * HOUR, repo_id, webhook("d-1"), vec![push("main", "bbbb222")]);
        assert!(replay.duplicate);
        assert!(replay.deployments().is_empty() && replay.changes.is_empty());
        assert_eq!(known_heads(&txn, repo_id).unwrap()["refs/heads/main"], "aaaa111", "a duplicate records nothing");

        // 73 hours after the first delivery the id is forgotten: the delivery runs.
        let late = record(&mut txn, start + 73 * HOUR, repo_id, webhook("d-1"), vec![push("main", "bbbb222")]);
        assert!(!late.duplicate);
        assert_eq!(late.deployments().len(), 1);
        assert_eq!(delivery_seen_at(&txn, repo_id, "d-1").unwrap(), Some(start + 73 * HOUR));

        // The same id on another repository is another delivery.
        let other_repo = connect(&mut txn, "https://github.com/org/other");
        assert!(!record(&mut txn, start + 73 * HOUR, other_repo, webhook("d-1"), vec![]).duplicate);
    }

    #[test]
    fn expired_delivery_ids_are_pruned_a_bounded_number_per_command() {
        let mut txn = Txn::new(&EmptyState);
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        let count = DELIVERY_PRUNE_PER_APPLY + 10;
        for n in 0..count {
            record(&mut txn, n as i64, repo_id, webhook(&format!("old-{n:03}")), vec![]);
        }
        let later = 100 * HOUR;
        record(&mut txn, later, repo_id, webhook("new-1"), vec![]);
        let remaining = (0..count).filter(|n| delivery_seen_at(&txn, repo_id, &format!("old-{n:03}")).unwrap().is_some()).count();
        assert_eq!(remaining, 10, "the oldest {DELIVERY_PRUNE_PER_APPLY} go first");
        record(&mut txn, later, repo_id, ScmSource::Poll { baseline: false }, vec![]);
        let remaining = (0..count).filter(|n| delivery_seen_at(&txn, repo_id, &format!("old-{n:03}")).unwrap().is_some()).count();
        assert_eq!(remaining, 0);
        assert_eq!(delivery_seen_at(&txn, repo_id, "new-1").unwrap(), Some(later), "a fresh id stays");
        let by_time = txn.scan_prefix(Table::StateMeta, DELIVERY_BY_TIME_PREFIX).unwrap();
        assert_eq!(by_time.len(), 1, "the time index is pruned with the ids");
    }

    #[test]
    fn a_commit_seen_by_webhook_and_poll_runs_once() {
        let mut txn = Txn::new(&EmptyState);
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        pipeline(&mut txn, repo_id, "main", None, BuildSettings::default());
        let by_webhook = record(&mut txn, 10, repo_id, webhook("d-1"), vec![push("main", "aaaa1111")]);
        assert_eq!(by_webhook.deployments().len(), 1);
        let by_poll = record(&mut txn, 20, repo_id, ScmSource::Poll { baseline: false }, vec![push("main", "aaaa1111")]);
        assert!(by_poll.deployments().is_empty());
        assert!(by_poll.changes[0].skipped[0].contains("already at aaaa1111"), "{:?}", by_poll.changes);

        // And the other way round: the poller first, then the webhook (with a new delivery id).
        let by_poll = record(&mut txn, 30, repo_id, ScmSource::Poll { baseline: false }, vec![push("main", "bbbb2222")]);
        assert_eq!(by_poll.deployments().len(), 1);
        assert_eq!(deployment(&txn, by_poll.deployments()[0]).scm.unwrap().source, "poll");
        let by_webhook = record(&mut txn, 40, repo_id, webhook("d-2"), vec![push("main", "bbbb2222")]);
        assert!(by_webhook.deployments().is_empty() && !by_webhook.duplicate);
        assert_eq!(known_heads(&txn, repo_id).unwrap(), BTreeMap::from([("refs/heads/main".to_string(), "bbbb2222".to_string())]));

        // Deleting the repository forgets its heads.
        propose(&mut txn, 50, Command::DeleteRepository { repo_id });
        assert!(known_heads(&txn, repo_id).unwrap().is_empty());
    }

    #[test]
    fn a_baseline_poll_records_heads_and_runs_nothing() {
        let mut txn = Txn::new(&EmptyState);
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        let tags = BuildSettings { trigger_events: Some(vec![TriggerEvent::Push, TriggerEvent::Tag]), ..BuildSettings::default() };
        pipeline(&mut txn, repo_id, "main", None, tags);
        let changes = vec![push("main", "aaaa1111"), ScmChange::Tag { tag: "v1".into(), commit: "cccc3333".into() }];
        let baseline = record(&mut txn, 10, repo_id, ScmSource::Poll { baseline: true }, changes);
        assert!(baseline.deployments().is_empty());
        assert!(baseline.changes.iter().all(|change| change.skipped[0].contains("baseline")), "{baseline:?}");
        assert!(txn.scan_prefix(Table::Deployments, b"").unwrap().is_empty());
        let heads = known_heads(&txn, repo_id).unwrap();
        assert_eq!(heads["refs/heads/main"], "aaaa1111");
        assert_eq!(heads["refs/tags/v1"], "cccc3333");
        // The webhook for the commit the baseline saw runs nothing either.
        assert!(record(&mut txn, 20, repo_id, webhook("d-1"), vec![push("main", "aaaa1111")]).deployments().is_empty());
        assert_eq!(record(&mut txn, 30, repo_id, webhook("d-2"), vec![push("main", "dddd4444")]).deployments().len(), 1);
    }

    #[test]
    fn pipelines_match_by_branch_pattern_and_event() {
        let mut txn = Txn::new(&EmptyState);
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        let default_branch = pipeline(&mut txn, repo_id, "main", None, BuildSettings::default());
        let releases = pipeline(&mut txn, repo_id, "releases", Some("release/*"), BuildSettings::default());
        let tagged = BuildSettings { trigger_events: Some(vec![TriggerEvent::Tag]), ..BuildSettings::default() };
        let tags_only = pipeline(&mut txn, repo_id, "tags", Some("**"), tagged);
        let inactive = pipeline(&mut txn, repo_id, "inactive", Some("**"), BuildSettings::default());
        let patch = crate::state::command::PipelinePatch { is_active: Some(false), ..Default::default() };
        propose(&mut txn, 3, Command::UpdatePipeline { pipeline_id: inactive, patch });
        let pipelines_of = |txn: &Txn, report: &ScmReport| -> Vec<u64> {
            report.deployments().iter().map(|&id| deployment(txn, id).pipeline_id).collect()
        };

        let report = record(&mut txn, 10, repo_id, webhook("d-1"), vec![push("release/1.0", "aaaa0001")]);
        assert_eq!(pipelines_of(&txn, &report), vec![releases]);
        assert!(report.changes[0].skipped.iter().any(|reason| reason.contains("does not run on push events")), "{report:?}");
        let job = build_job(&txn, report.deployments()[0]);
        assert_eq!(job.spec["branch"], "release/1.0", "the job builds the pushed branch, not the pattern");
        assert!(job.spec.get("fetch_ref").is_none(), "a push checks out the exact commit");

        let report = record(&mut txn, 20, repo_id, webhook("d-2"), vec![push("release/1.0/hotfix", "aaaa0002")]);
        assert!(report.deployments().is_empty());
        let report = record(&mut txn, 30, repo_id, webhook("d-3"), vec![push("feature/x", "aaaa0003")]);
        assert_eq!(report.deployments(), Vec::<u64>::new());
        let report = record(&mut txn, 40, repo_id, webhook("d-4"), vec![push("main", "aaaa0004")]);
        assert_eq!(pipelines_of(&txn, &report), vec![default_branch], "no branch on the pipeline means the repository's");
        let origin = deployment(&txn, report.deployments()[0]).scm.unwrap();
        assert_eq!(
            origin,
            ScmOrigin {
                repo_id,
                source: "webhook".into(),
                event: "push".into(),
                git_ref: "refs/heads/main".into(),
                head_commit: "aaaa0004".into(),
                pull_request: None,
                delivery: Some("d-4".into()),
            }
        );

        // Tags run only the pipelines that ask for them.
        let report = record(&mut txn, 50, repo_id, webhook("d-5"), vec![ScmChange::Tag { tag: "v1.0".into(), commit: "bbbb0001".into() }]);
        assert_eq!(pipelines_of(&txn, &report), vec![tags_only]);
        let tag_run = deployment(&txn, report.deployments()[0]);
        assert_eq!((tag_run.commit_hash.as_str(), tag_run.environment.as_str()), ("bbbb0001", "staging"));

        // A pull request runs the pipelines of its target branch, on the merge ref.
        let report = record(&mut txn, 60, repo_id, webhook("d-6"), vec![pull_request(7, ScmPullRequestAction::Opened, "cccc0007")]);
        assert_eq!(pipelines_of(&txn, &report), vec![default_branch]);
        let run = deployment(&txn, report.deployments()[0]);
        assert_eq!(run.commit_hash, "cccc0007", "the deployment names the pull request's head");
        let origin = run.scm.unwrap();
        assert_eq!((origin.event.as_str(), origin.git_ref.as_str(), origin.pull_request), ("pull_request", "refs/pull/7/merge", Some(7)));
        let job = build_job(&txn, run.deployment_id);
        assert_eq!(job.spec["fetch_ref"], "refs/pull/7/merge");
        assert_eq!(job.spec["commit"], "cccc0007");
        assert_eq!(job.spec["branch"], "feature");

        // Closed and merged pull requests never build.
        for (delivery, action) in [("d-7", ScmPullRequestAction::Closed), ("d-8", ScmPullRequestAction::Merged)] {
            let report = record(&mut txn, 70, repo_id, webhook(delivery), vec![pull_request(7, action, "cccc0007")]);
            assert!(report.deployments().is_empty(), "{action:?}");
        }
        // Without a merge ref (Bitbucket) the checks run on the head commit of the source branch.
        let mut bitbucket = pull_request(8, ScmPullRequestAction::Opened, "dddd0008");
        if let ScmChange::PullRequest { merge_ref, .. } = &mut bitbucket {
            *merge_ref = None;
        }
        let report = record(&mut txn, 80, repo_id, webhook("d-9"), vec![bitbucket]);
        let run = deployment(&txn, report.deployments()[0]);
        assert_eq!(run.scm.unwrap().git_ref, "refs/heads/feature");
        assert!(build_job(&txn, run.deployment_id).spec.get("fetch_ref").is_none());
    }

    #[test]
    fn a_preview_environment_lives_as_long_as_its_pull_request() {
        let mut txn = Txn::new(&EmptyState);
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        let preview = BuildSettings { preview_environments: true, ..BuildSettings::default() };
        let pipeline_id = pipeline(&mut txn, repo_id, "previews", None, preview.clone());
        let other_repo = connect(&mut txn, "https://github.com/org/other");
        let other_pipeline = pipeline(&mut txn, other_repo, "previews", None, preview);

        let opened = record(&mut txn, 10, repo_id, webhook("d-1"), vec![pull_request(7, ScmPullRequestAction::Opened, "aaaa0001")]);
        let first = deployment(&txn, opened.deployments()[0]);
        assert_eq!(first.environment, "pr-7");
        let environment: Environment = load(&txn, Table::Environments, b"pr-7").unwrap().unwrap();
        assert_eq!(environment.previews, vec![PreviewOwner { repo_id, pipeline_id, pull_request: 7 }]);
        assert_eq!(environment.created_at, 10);

        // Bitbucket's `updated` with an unchanged head runs nothing; new commits run again.
        let same = record(&mut txn, 20, repo_id, webhook("d-2"), vec![pull_request(7, ScmPullRequestAction::Synchronized, "aaaa0001")]);
        assert!(same.deployments().is_empty());
        let synchronized =
            record(&mut txn, 30, repo_id, webhook("d-3"), vec![pull_request(7, ScmPullRequestAction::Synchronized, "bbbb0002")]);
        assert_eq!(deployment(&txn, synchronized.deployments()[0]).environment, "pr-7");
        // The other repository's pull request #7 shares the environment's name.
        let other = record(&mut txn, 40, other_repo, webhook("d-4"), vec![pull_request(7, ScmPullRequestAction::Opened, "cccc0003")]);
        assert_eq!(deployment(&txn, other.deployments()[0]).pipeline_id, other_pipeline);

        // The first pull request is merged: its running deployments are cancelled, the other's stay.
        let merged = record(&mut txn, 50, repo_id, webhook("d-5"), vec![pull_request(7, ScmPullRequestAction::Merged, "bbbb0002")]);
        assert!(merged.deployments().is_empty());
        let mut cancelled = merged.cancelled_deployments.clone();
        cancelled.sort();
        assert_eq!(cancelled, vec![opened.deployments()[0], synchronized.deployments()[0]]);
        for deployment_id in &cancelled {
            let ended = deployment(&txn, *deployment_id);
            assert_eq!(ended.status, DeploymentStatus::Failed);
            assert!(ended.status_reason.unwrap().contains("preview environment pr-7 removed"));
            assert_eq!(build_job(&txn, *deployment_id).status, JobStatus::Cancelled);
        }
        assert_eq!(deployment(&txn, other.deployments()[0]).status, DeploymentStatus::Pending);
        let environment: Environment = load(&txn, Table::Environments, b"pr-7").unwrap().unwrap();
        assert_eq!(environment.previews, vec![PreviewOwner { repo_id: other_repo, pipeline_id: other_pipeline, pull_request: 7 }]);

        // The last owner closes: the environment record goes.
        let closed = record(&mut txn, 60, other_repo, webhook("d-6"), vec![pull_request(7, ScmPullRequestAction::Closed, "cccc0003")]);
        assert_eq!(closed.cancelled_deployments, other.deployments());
        assert!(load::<Environment>(&txn, Table::Environments, b"pr-7").unwrap().is_none());
        // Reopened, it deploys a preview again.
        let reopened = record(&mut txn, 70, repo_id, webhook("d-7"), vec![pull_request(7, ScmPullRequestAction::Reopened, "bbbb0002")]);
        assert_eq!(reopened.deployments().len(), 1);
        assert!(load::<Environment>(&txn, Table::Environments, b"pr-7").unwrap().is_some());
    }

    #[test]
    fn bad_commands_are_refused_whole() {
        let mut txn = Txn::new(&EmptyState);
        let refuse = |txn: &mut Txn, repo_id: u64, source: ScmSource| {
            let proposal =
                Proposal { time: 1, actor: None, command: Command::RecordScmChanges { repo_id, source, changes: vec![] }, source: None };
            apply(txn, &proposal, 1).unwrap().result.unwrap_err()
        };
        assert_eq!(refuse(&mut txn, 9, webhook("d")).message, "repository 9 not found");
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        assert_eq!(refuse(&mut txn, repo_id, webhook(&"x".repeat(201))).code, RejectionCode::Invalid);
        assert!(same_commit("ABCDEF1234", "abcdef1"));
        assert!(!same_commit("abcdef1234", "abcdef"), "six digits are too few to trust");
        assert!(!same_commit("abcdef1234", "abcdef1299"));
    }

    #[test]
    fn the_command_and_its_report_keep_their_wire_format() {
        // Other nodes (and the Raft log) read these bytes: the names and tags are fixed.
        let command = Command::RecordScmChanges {
            repo_id: 3,
            source: ScmSource::Webhook { delivery: Some("d-1".into()) },
            changes: vec![
                push("main", "aaaa1111"),
                ScmChange::Tag { tag: "v1".into(), commit: "bbbb2222".into() },
                pull_request(7, ScmPullRequestAction::Synchronized, "cccc3333"),
            ],
        };
        let json = serde_json::to_value(&command).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "record_scm_changes",
                "repo_id": 3,
                "source": {"kind": "webhook", "delivery": "d-1"},
                "changes": [
                    {"kind": "push", "branch": "main", "before": null, "after": "aaaa1111"},
                    {"kind": "tag", "tag": "v1", "commit": "bbbb2222"},
                    {"kind": "pull_request", "number": 7, "action": "synchronized", "source_branch": "feature", "target_branch": "main",
                     "head_commit": "cccc3333", "merge_ref": "refs/pull/7/merge"}
                ]
            })
        );
        assert_eq!(serde_json::from_value::<Command>(json).unwrap(), command);
        let poll: ScmSource = serde_json::from_str(r#"{"kind": "poll", "baseline": true}"#).unwrap();
        assert_eq!(poll, ScmSource::Poll { baseline: true });

        // A deployment and build settings written before these fields existed still decode.
        let old_settings: BuildSettings = serde_json::from_str(r#"{"image": "alpine:3.20"}"#).unwrap();
        assert_eq!((old_settings.trigger_events, old_settings.preview_environments), (None, false));
        assert_eq!(serde_json::to_string(&BuildSettings::default()).unwrap(), "{}", "defaults add no bytes to stored records");
    }

    #[test]
    fn state_events_follow_what_the_command_did() {
        use crate::state::events::{StateEvent, events_of};
        let mut txn = Txn::new(&EmptyState);
        let repo_id = connect(&mut txn, "https://github.com/org/repo");
        pipeline(&mut txn, repo_id, "previews", None, BuildSettings { preview_environments: true, ..BuildSettings::default() });
        let run = |txn: &mut Txn, time: i64, change: ScmChange| {
            let command = Command::RecordScmChanges { repo_id, source: ScmSource::Poll { baseline: false }, changes: vec![change] };
            let proposal = Proposal { time, actor: None, command: command.clone(), source: None };
            let outcome = apply(txn, &proposal, time as u64).unwrap();
            events_of(&command, &outcome)
        };
        let opened = run(&mut txn, 10, pull_request(4, ScmPullRequestAction::Opened, "aaaa0001"));
        let deployment_id = txn.scan_prefix(Table::Deployments, b"").unwrap().len() as u64;
        // The new deployment's `queued` event wakes its followers.
        assert_eq!(opened, vec![StateEvent::DeploymentProgress { deployment_id }, StateEvent::WorkChanged]);
        assert_eq!(
            run(&mut txn, 20, pull_request(4, ScmPullRequestAction::Closed, "aaaa0001")),
            vec![
                StateEvent::DeploymentProgress { deployment_id },
                StateEvent::DeploymentChanged { deployment_id },
                StateEvent::WorkChanged
            ]
        );
        assert!(run(&mut txn, 30, push("unmatched/branch", "bbbb0002")).is_empty(), "nothing queued, nothing to wake");
    }
}
