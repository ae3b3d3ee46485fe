//! Environments' protection in the replicated state: which deployments an environment takes
//! (branches, promotion source) and which wait for approvals. Checked in `apply`, so every way
//! a deployment is made — the API, the CLI, a webhook — meets the same rules.

use super::apply::{NewDeployment, index, index_ids, load, load_id, not_found, store};
use super::codec::id_key;
use super::command::{NewDeploymentEvent, Outcome, RejectionCode};
use super::records::*;
use super::txn::{StateRead, Txn};
use crate::store::{StoreResult, Table};

/// An environment's settings (the defaults when it has no record).
pub fn settings(state: &dyn StateRead, name: &str) -> StoreResult<EnvironmentSettings> {
    Ok(load::<Environment>(state, Table::Environments, name.as_bytes())?.map(|environment| environment.settings).unwrap_or_default())
}

/// Why the environment refuses `new`, if it does. A promotion of a commit that passed the
/// source environment is made to release that deployment's build (`release_of`).
pub(super) fn admit(txn: &Txn, pipeline: &Pipeline, new: &mut NewDeployment) -> StoreResult<Result<(), String>> {
    let settings = settings(txn, &new.environment)?;
    let environment = &new.environment;
    let source = match new.release_of {
        Some(id) => load_id::<Deployment>(txn, Table::Deployments, id)?,
        None => None,
    };
    // Rolling back returns to a release the environment already ran.
    if let Some(from) = settings.promote_from.as_deref().filter(|_| new.rollback_of.is_none()) {
        let passed = match &source {
            Some(source) => {
                (source.environment == from && source.pipeline_id == pipeline.pipeline_id && source.status == DeploymentStatus::Success)
                    .then(|| source.clone())
            }
            None => newest_success(txn, pipeline.pipeline_id, from, &new.commit_hash)?,
        };
        let Some(passed) = passed else {
            return Ok(Err(format!(
                "{environment} takes only what succeeded in {from}: commit {} of pipeline {} has no successful deployment there; deploy it to {from} first, then promote it",
                new.commit_hash, pipeline.pipeline_id
            )));
        };
        new.release_of = Some(passed.deployment_id);
        if new.checkout.branch.is_none() {
            new.checkout.branch = passed.branch.clone();
        }
    }
    if let Some(allowed) = &settings.allowed_branches {
        let branch = new.checkout.branch.clone().or_else(|| source.as_ref().and_then(|source| source.branch.clone()));
        let matches =
            branch.as_deref().is_some_and(|branch| allowed.iter().any(|pattern| crate::scm::glob::branch_matches(pattern, branch)));
        if !matches {
            let from = branch.map(|branch| format!("branch {branch}")).unwrap_or_else(|| "a commit, not a branch".to_string());
            return Ok(Err(format!(
                "{environment} takes deployments from branches {} only, and this one is of {from}; deploy an allowed branch (\"branch\": ...)",
                allowed.join(", ")
            )));
        }
    }
    Ok(Ok(()))
}

/// The newest successful deployment of `commit` by the pipeline to `environment`.
fn newest_success(state: &dyn StateRead, pipeline_id: u64, environment: &str, commit: &str) -> StoreResult<Option<Deployment>> {
    let mut found = None;
    for deployment_id in index_ids(state, index::DEPLOYMENTS_BY_PIPELINE, &pipeline_id.to_string())? {
        if let Some(deployment) = load_id::<Deployment>(state, Table::Deployments, deployment_id)?
            && deployment.environment == environment
            && deployment.status == DeploymentStatus::Success
            && deployment.commit_hash.eq_ignore_ascii_case(commit)
        {
            found = Some(deployment);
        }
    }
    Ok(found)
}

/// The approvals a new deployment to `environment` waits for, if any.
pub(super) fn required_approvals(state: &dyn StateRead, environment: &str) -> StoreResult<Option<u32>> {
    Ok(settings(state, environment)?.required_approvals.filter(|&needed| needed > 0))
}

/// `Command::SetEnvironment`.
pub(super) fn set(txn: &mut Txn, name: &str, settings: &EnvironmentSettings, now: Timestamp) -> StoreResult<Outcome> {
    if let Some(from) = &settings.promote_from
        && from == name
    {
        return Ok(Outcome::rejected(RejectionCode::Invalid, format!("{name} cannot promote from itself")));
    }
    let mut environment = load::<Environment>(txn, Table::Environments, name.as_bytes())?.unwrap_or_else(|| Environment {
        name: name.to_string(),
        settings: EnvironmentSettings::default(),
        previews: Vec::new(),
        created_at: now,
        updated_at: now,
    });
    environment.settings = settings.clone();
    environment.updated_at = now;
    store(txn, Table::Environments, name.as_bytes().to_vec(), &environment);
    Ok(Outcome::applied(None, 1))
}

/// `Command::ApproveDeployment`, by the proposal's actor.
pub(super) fn approve(txn: &mut Txn, deployment_id: u64, actor: Option<u64>, now: Timestamp) -> StoreResult<Outcome> {
    let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else {
        return Ok(not_found("deployment", deployment_id));
    };
    let Some(user) = actor.map(|user_id| load_id::<User>(txn, Table::Users, user_id)).transpose()?.flatten() else {
        return Ok(Outcome::rejected(RejectionCode::Invalid, "an approval needs a person"));
    };
    if deployment.required_approvals.is_none() {
        return Ok(Outcome::rejected(RejectionCode::Conflict, format!("deployment {deployment_id} does not wait for approvals")));
    }
    if deployment.status.is_final() || deployment.rollout.is_some() {
        return Ok(Outcome::rejected(RejectionCode::Conflict, format!("deployment {deployment_id} is already past its approval")));
    }
    if user.role < Role::Developer {
        return Ok(Outcome::rejected(RejectionCode::Invalid, "viewers cannot approve deployments"));
    }
    if user.role != Role::Admin && deployment.triggered_by == Some(user.user_id) {
        return Ok(Outcome::rejected(
            RejectionCode::Conflict,
            "you triggered this deployment: another developer (or an admin) must approve it",
        ));
    }
    if deployment.approvals.iter().any(|approval| approval.user_id == user.user_id) {
        return Ok(Outcome::rejected(RejectionCode::Conflict, format!("{} already approved deployment {deployment_id}", user.username)));
    }
    deployment.approvals.push(Approval { user_id: user.user_id, username: user.username.clone(), role: user.role, at: now });
    let needed = deployment.required_approvals.unwrap_or(0);
    let developers = deployment.approvals.iter().filter(|approval| approval.role == Role::Developer).count();
    let message = if deployment.approved() {
        format!("approved by {} ({:?}); the deployment may roll out", user.username, user.role).to_lowercase()
    } else {
        format!("approved by {} ({developers} of {needed} developer approvals)", user.username)
    };
    super::progress::append(txn, &mut deployment, &[NewDeploymentEvent::new(event_kind::APPROVED, message)], now);
    deployment.updated_at = now;
    store(txn, Table::Deployments, id_key(deployment_id), &deployment);
    Ok(Outcome::applied(Some(deployment_id), 1))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::command::{Command, PipelinePatch};
    use crate::state::tests::{propose, seed_pipeline};
    use crate::state::txn::EmptyState;

    fn deploy(txn: &mut Txn, pipeline_id: u64, commit: &str, environment: &str, branch: Option<&str>) -> Result<u64, String> {
        let create = Command::CreateDeployment {
            pipeline_id,
            commit_hash: commit.into(),
            environment: environment.into(),
            config_overrides: BTreeMap::new(),
            rollback_of: None,
            branch: branch.map(str::to_string),
            release_of: None,
        };
        propose(txn, 10, create).result.map(|applied| applied.id.unwrap()).map_err(|rejection| rejection.message)
    }

    fn protected(txn: &mut Txn) -> u64 {
        let pipeline_id = seed_pipeline(txn);
        let deploy_settings = DeploySettings { public_port: Some(8080), ..DeploySettings::default() };
        let patch = PipelinePatch { deploy: Some(deploy_settings), ..PipelinePatch::default() };
        propose(txn, 3, Command::UpdatePipeline { pipeline_id, patch }).result.unwrap();
        let settings = EnvironmentSettings {
            promote_from: Some("staging".into()),
            required_approvals: Some(2),
            allowed_branches: Some(vec!["main".into(), "release/*".into()]),
            strategy: Some(DeployStrategy::Canary),
        };
        propose(txn, 4, Command::SetEnvironment { name: "production".into(), settings }).result.unwrap();
        pipeline_id
    }

    #[test]
    fn production_takes_only_what_passed_staging_and_releases_that_build() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = protected(&mut txn);
        let commit = "a".repeat(40);
        let refused = deploy(&mut txn, pipeline_id, &commit, "production", Some("main")).unwrap_err();
        assert!(refused.contains("takes only what succeeded in staging") && refused.contains("deploy it to staging first"), "{refused}");
        let staging = deploy(&mut txn, pipeline_id, &commit, "staging", Some("main")).unwrap();
        let set = Command::SetDeploymentStatus { deployment_id: staging, status: DeploymentStatus::Success, reason: None };
        propose(&mut txn, 11, set).result.unwrap();
        let production = deploy(&mut txn, pipeline_id, &commit, "production", None).unwrap();
        let deployment: Deployment = load_id(&txn, Table::Deployments, production).unwrap().unwrap();
        assert_eq!(deployment.release_of, Some(staging), "the staging build is released, not rebuilt");
        assert_eq!(deployment.branch.as_deref(), Some("main"), "the branch comes with the promoted build");
        assert!(index_ids(&txn, index::JOBS_BY_DEPLOYMENT, &production.to_string()).unwrap().is_empty(), "no build job");
        assert_eq!(deployment.required_approvals, Some(2));
        assert!(!deployment.approved());
    }

    #[test]
    fn a_branch_outside_the_allowed_ones_is_refused() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = protected(&mut txn);
        for (commit, branch) in [("b", Some("feature/x")), ("d", None)] {
            let staging = deploy(&mut txn, pipeline_id, &commit.repeat(40), "staging", branch).unwrap();
            let set = Command::SetDeploymentStatus { deployment_id: staging, status: DeploymentStatus::Success, reason: None };
            propose(&mut txn, 11, set).result.unwrap();
        }
        // The promoted build brings its branch along.
        let refused = deploy(&mut txn, pipeline_id, &"b".repeat(40), "production", None).unwrap_err();
        assert!(refused.contains("branches main, release/* only") && refused.contains("branch feature/x"), "{refused}");
        let refused = deploy(&mut txn, pipeline_id, &"d".repeat(40), "production", None).unwrap_err();
        assert!(refused.contains("a commit, not a branch"), "{refused}");
    }

    #[test]
    fn approvals_by_two_developers_or_one_admin_never_by_oneself_or_a_viewer() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = protected(&mut txn);
        let commit = "c".repeat(40);
        let staging = deploy(&mut txn, pipeline_id, &commit, "staging", Some("main")).unwrap();
        propose(&mut txn, 11, Command::SetDeploymentStatus { deployment_id: staging, status: DeploymentStatus::Success, reason: None })
            .result
            .unwrap();
        // Users: 1 is the deployer (an admin in these helpers), 2 and 3 developers, 4 a viewer.
        let mut users = Vec::new();
        for (name, role) in [("dana", Role::Developer), ("dev", Role::Developer), ("vic", Role::Viewer), ("root", Role::Admin)] {
            let create = Command::CreateUser { username: name.into(), email: format!("{name}@x"), password_hash: "h".into(), role };
            users.push(propose(&mut txn, 12, create).result.unwrap().id.unwrap());
        }
        let production = {
            let create = Command::CreateDeployment {
                pipeline_id,
                commit_hash: commit.clone(),
                environment: "production".into(),
                config_overrides: BTreeMap::new(),
                rollback_of: None,
                branch: None,
                release_of: None,
            };
            let proposal = crate::state::command::Proposal { time: 13, actor: Some(users[0]), command: create, source: None };
            crate::state::apply(&mut txn, &proposal, 13).unwrap().result.unwrap().id.unwrap()
        };
        let approve = |txn: &mut Txn, user: u64| {
            let proposal = crate::state::command::Proposal {
                time: 14,
                actor: Some(user),
                command: Command::ApproveDeployment { deployment_id: production },
                source: None,
            };
            crate::state::apply(txn, &proposal, 14).unwrap().result.map_err(|rejection| rejection.message)
        };
        assert!(approve(&mut txn, users[0]).unwrap_err().contains("you triggered this deployment"));
        assert!(approve(&mut txn, users[2]).unwrap_err().contains("viewers cannot approve"));
        approve(&mut txn, users[1]).unwrap();
        assert!(approve(&mut txn, users[1]).unwrap_err().contains("already approved"));
        let deployment: Deployment = load_id(&txn, Table::Deployments, production).unwrap().unwrap();
        assert!(!deployment.approved(), "one developer of two");
        // An admin's approval is enough on its own.
        approve(&mut txn, users[3]).unwrap();
        let deployment: Deployment = load_id(&txn, Table::Deployments, production).unwrap().unwrap();
        assert!(deployment.approved());
        let kinds: Vec<String> =
            crate::state::progress::events_after(&txn, production, 0, 100).unwrap().into_iter().map(|event| event.kind).collect();
        assert_eq!(kinds, [event_kind::QUEUED, event_kind::APPROVAL_REQUIRED, event_kind::APPROVED, event_kind::APPROVED]);
    }
}
