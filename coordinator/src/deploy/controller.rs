//! The deployment controller: on the leader, a loop that starts the rollouts of built
//! deployments (one per pipeline and environment at a time, in order) and drives each with the
//! planner. It holds no state of its own: every round reads the replicated deployments, asks
//! [`plan`] for the next actions and proposes them (`RolloutStep`, guarded by the rollout's
//! version), so a new leader simply carries on from the last applied facts.

use std::sync::Arc;
use std::time::Duration;

use crate::deploy::plan::{self, Action};
use crate::node::{Node, Requester};
use crate::state::Command;
use crate::state::apply::{index, index_ids, load_id};
use crate::state::events::StateEvent;
use crate::state::records::*;
use crate::state::rollout::release_name;
use crate::state::scm::{PREVIEW_HOSTS, preview_pull_request};
use crate::state::txn::StateRead;
use crate::store::Table;

pub struct Controller {
    node: Arc<Node>,
}

/// A round at least this often (waits of the planner, agents coming online).
const TICK: Duration = Duration::from_millis(500);

impl Controller {
    pub fn new(node: Arc<Node>) -> Self {
        Controller { node }
    }

    pub async fn run(self) {
        let mut events = self.node.subscribe();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(StateEvent::RepositoriesChanged) => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(TICK) => {}
            }
            // Take in whatever else arrived: one round answers them all.
            while events.try_recv().is_ok() {}
            if !self.node.is_leader() {
                continue;
            }
            if let Err(error) = self.round().await {
                tracing::warn!(%error, "deployment controller round failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// One round over every deployment that has not ended.
    pub async fn round(&self) -> anyhow::Result<()> {
        let mut open = Vec::new();
        {
            let state = self.node.state();
            for status in ["pending", "in_progress"] {
                for deployment_id in index_ids(&state, index::DEPLOYMENTS_BY_STATUS, status)? {
                    if let Some(deployment) = load_id::<Deployment>(&state, Table::Deployments, deployment_id)?
                        && deployment.rolls_out
                    {
                        open.push(deployment);
                    }
                }
            }
        }
        open.sort_by_key(|deployment| deployment.deployment_id);
        for deployment in &open {
            let command = match &deployment.rollout {
                Some(rollout) => next_step(deployment, rollout),
                None => self.start(deployment, &open).await?,
            };
            if let Some(command) = command {
                let (outcome, _) = self.node.propose(&Requester::system(), command).await?;
                if let Err(rejection) = outcome.result {
                    tracing::debug!(deployment_id = deployment.deployment_id, %rejection.message, "rollout command refused");
                }
            }
        }
        Ok(())
    }

    /// The command that begins `deployment`'s rollout, once it is its turn and it is built;
    /// or one that fails it with what to fix.
    async fn start(&self, deployment: &Deployment, open: &[Deployment]) -> anyhow::Result<Option<Command>> {
        let earlier = open.iter().any(|other| {
            other.deployment_id < deployment.deployment_id
                && other.pipeline_id == deployment.pipeline_id
                && other.environment == deployment.environment
        });
        if earlier {
            return Ok(None);
        }
        let state = self.node.state();
        if !deployment.approved() || !build_succeeded(&state, deployment)? {
            return Ok(None);
        }
        let fail = |reason: String| {
            Some(Command::SetDeploymentStatus {
                deployment_id: deployment.deployment_id,
                status: DeploymentStatus::Failed,
                reason: Some(reason),
            })
        };
        let Some(pipeline) = load_id::<Pipeline>(&state, Table::Pipelines, deployment.pipeline_id)? else {
            return Ok(fail(format!("pipeline {} no longer exists", deployment.pipeline_id)));
        };
        if let Err(reason) = crate::state::rollout::public_port(&pipeline.deploy, &deployment.environment) {
            return Ok(fail(reason));
        }
        let hosts = deploy_hosts(&state, &deployment.environment, pipeline.deploy.regions.as_deref().unwrap_or_default())?;
        if hosts.is_empty() {
            let also = if preview_pull_request(&deployment.environment).is_some() {
                format!(" (or environment={PREVIEW_HOSTS})")
            } else {
                String::new()
            };
            return Ok(fail(format!(
                "no online deploy agent serves environment {env}: register agents with the labels pool=deploy and environment={env}{also}",
                env = deployment.environment
            )));
        }
        let wanted =
            pipeline.deploy.artifact.clone().unwrap_or_else(|| if pipeline.build.dockerfile.is_some() { "image" } else { "files" }.into());
        let Some((artifact_digest, artifact_kind)) = release_artifact(&state, deployment, &wanted)? else {
            return Ok(fail(format!(
                "there is no {wanted} artifact to release: the build of deployment {} produced none (set the pipeline's build.{} or deploy.artifact)",
                deployment.release_of.unwrap_or(deployment.deployment_id),
                if wanted == "image" { "dockerfile" } else { "artifacts" }
            )));
        };
        let previous = live_release(&state, deployment)?;
        // The configuration is not chosen here: the deployment resolved its versions when it was
        // created (a rollback took its target's), and `apply` takes them from the record.
        Ok(Some(Command::StartRollout {
            deployment_id: deployment.deployment_id,
            hosts,
            artifact_digest,
            artifact_kind,
            previous,
            config: Vec::new(),
        }))
    }
}

/// The next `RolloutStep` of a rollout, if the planner has anything to do now.
fn next_step(deployment: &Deployment, rollout: &Rollout) -> Option<Command> {
    let mut facts = rollout.facts.clone();
    facts.now = crate::auth::now_millis();
    let actions: Vec<Action> = plan::plan(&facts).into_iter().filter(|action| !matches!(action, Action::WaitUntil { .. })).collect();
    (!actions.is_empty()).then_some(Command::RolloutStep { deployment_id: deployment.deployment_id, version: rollout.version, actions })
}

/// Whether the deployment's build (if it has one) succeeded. A deployment without a build job
/// (a rollback, a promotion) releases what an earlier one built.
fn build_succeeded(state: &dyn StateRead, deployment: &Deployment) -> anyhow::Result<bool> {
    for job_id in index_ids(state, index::JOBS_BY_DEPLOYMENT, &deployment.deployment_id.to_string())? {
        if let Some(job) = load_id::<Job>(state, Table::Jobs, job_id)?
            && !crate::state::rollout::is_release_job(&job)
            && job.status != JobStatus::Succeeded
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The environment's online deploy agents, in rollout order: region waves (the pipeline's
/// `regions` first, in its order, then the others by name), then by agent name. A pull
/// request's preview (`pr-<n>`) also goes to the hosts labelled `environment=preview`.
fn deploy_hosts(state: &dyn StateRead, environment: &str, regions: &[String]) -> anyhow::Result<Vec<RolloutHost>> {
    let has = |labels: &std::collections::BTreeMap<String, String>, key: &str, value: &str| {
        labels.get(key).is_some_and(|values| values.split(',').any(|element| element.trim() == value))
    };
    let preview = preview_pull_request(environment).is_some();
    let mut hosts = Vec::new();
    for (_, bytes) in state.scan_prefix(Table::Agents, b"")? {
        let agent: Agent = crate::state::codec::decode(Table::Agents, &bytes)?;
        let serves = has(&agent.labels, "environment", environment) || (preview && has(&agent.labels, "environment", PREVIEW_HOSTS));
        if agent.state == AgentState::Online && has(&agent.labels, "pool", "deploy") && serves {
            hosts.push(RolloutHost {
                agent_id: agent.agent_id,
                name: agent.name,
                region: agent.labels.get("region").cloned(),
                job: None,
                unwind_failures: 0,
            });
        }
    }
    let wave = |host: &RolloutHost| {
        let region = host.region.clone().unwrap_or_default();
        (regions.iter().position(|wanted| *wanted == region).unwrap_or(regions.len()), region, host.name.clone())
    };
    hosts.sort_by_key(wave);
    Ok(hosts)
}

/// What a deployment releases, as (digest, kind): what an earlier deployment released when it
/// releases that one's build (`release_of`: a promotion, a rollback), else the `kind` artifact
/// its own build (or `release_of`'s build) produced.
fn release_artifact(state: &dyn StateRead, deployment: &Deployment, kind: &str) -> anyhow::Result<Option<(String, String)>> {
    let built_by = deployment.release_of.unwrap_or(deployment.deployment_id);
    if let Some(source) = deployment.release_of.map(|id| load_id::<Deployment>(state, Table::Deployments, id)).transpose()?.flatten()
        && let Some(rollout) = source.rollout
    {
        return Ok(Some((rollout.artifact_digest, rollout.artifact_kind)));
    }
    let mut found = None;
    for artifact_id in index_ids(state, index::ARTIFACTS_BY_PIPELINE, &deployment.pipeline_id.to_string())? {
        if let Some(artifact) = load_id::<Artifact>(state, Table::Artifacts, artifact_id)?
            && artifact.deployment_id == Some(built_by)
            && artifact.kind.as_deref().unwrap_or("files") == kind
        {
            found = Some((artifact.digest, kind.to_string()));
        }
    }
    Ok(found)
}

/// The release serving the environment now: the newest successful rollout's.
fn live_release(state: &dyn StateRead, deployment: &Deployment) -> anyhow::Result<Option<String>> {
    Ok(successful_rollouts(state, deployment)?.last().map(|live| release_name(live.deployment_id)))
}

/// Successful rollouts of the deployment's pipeline to its environment, oldest first.
fn successful_rollouts(state: &dyn StateRead, deployment: &Deployment) -> anyhow::Result<Vec<Deployment>> {
    let mut found = Vec::new();
    for deployment_id in index_ids(state, index::DEPLOYMENTS_BY_PIPELINE, &deployment.pipeline_id.to_string())? {
        if deployment_id == deployment.deployment_id {
            continue;
        }
        if let Some(candidate) = load_id::<Deployment>(state, Table::Deployments, deployment_id)?
            && candidate.status == DeploymentStatus::Success
            && candidate.environment == deployment.environment
            && candidate.rollout.is_some()
        {
            found.push(candidate);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::command::{ArtifactOrigin, JobEnd, PipelinePatch};

    async fn apply(node: &Node, command: Command) -> Option<u64> {
        let (outcome, _) = node.propose(&Requester::system(), command).await.expect("proposed");
        outcome.result.unwrap_or_else(|rejection| panic!("refused: {}", rejection.message)).id
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
    }

    async fn agent(node: &Node, name: &str, labels: BTreeMap<String, String>) -> u64 {
        let register = Command::RegisterAgent {
            name: name.into(),
            labels: labels.clone(),
            credential_hash: format!("h-{name}"),
            registration_token_hash: "t".into(),
        };
        let agent_id = apply(node, register).await.unwrap();
        let connected = Command::AgentConnected {
            agent_id,
            node_id: 1,
            labels,
            capacity: 2,
            executors: vec!["docker".into()],
            draining: false,
            version: "t".into(),
        };
        apply(node, connected).await;
        agent_id
    }

    /// A deployment whose build ran on `builder` and produced an image.
    async fn built(node: &Node, pipeline_id: u64, builder: u64, commit: &str) -> u64 {
        let create = Command::CreateDeployment {
            pipeline_id,
            commit_hash: commit.into(),
            environment: "staging".into(),
            config_overrides: BTreeMap::new(),
            rollback_of: None,
            branch: None,
            release_of: None,
        };
        let deployment_id = apply(node, create).await.unwrap();
        let job_id = index_ids(&node.state(), index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string()).unwrap()[0];
        apply(node, Command::AssignJob { job_id, agent_id: builder, attempt: 1, lease_expires_at: i64::MAX }).await;
        let origin = ArtifactOrigin { deployment_id, job_id, attempt: 1, commit_hash: commit.into(), kind: "image".into() };
        let record = Command::RecordArtifact {
            pipeline_id,
            version: commit.into(),
            artifact_path: format!("artifacts/{commit}"),
            digest: commit.repeat(64 / commit.len()),
            size_bytes: 1,
            produced_by: Some(origin),
        };
        apply(node, record).await;
        apply(
            node,
            Command::FinishJob { job_id, attempt: 1, end: JobEnd::Succeeded, reason: None, output: None, measured: Default::default() },
        )
        .await;
        deployment_id
    }

    fn deployment(node: &Node, deployment_id: u64) -> Deployment {
        load_id(&node.state(), Table::Deployments, deployment_id).unwrap().unwrap()
    }

    #[tokio::test]
    async fn one_rollout_per_pipeline_and_environment_at_a_time_the_next_waits_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::testing::single_leader(dir.path(), "").await;
        apply(&node, Command::CreateRegistrationToken { description: "t".into(), token_hash: "t".into(), expires_at: i64::MAX }).await;
        let repo = Command::ConnectRepository {
            name: "repo".into(),
            repo_url: "https://github.com/org/repo".into(),
            branch: "main".into(),
            scm_type: ScmType::Github,
            webhook_secret: None,
            api_url: None,
            access_token: None,
            poll_interval_seconds: None,
        };
        let repo_id = apply(&node, repo).await.unwrap();
        let pipeline = Command::CreatePipeline {
            name: "web".into(),
            repo_id,
            branch: Some("main".into()),
            build_command: None,
            deploy_strategy: DeployStrategy::Rolling,
            environment: "staging".into(),
            build: BuildSettings { dockerfile: Some("Dockerfile".into()), ..BuildSettings::default() },
            deploy: DeploySettings { public_port: Some(8080), regions: Some(vec!["us".into()]), ..DeploySettings::default() },
        };
        let pipeline_id = apply(&node, pipeline).await.unwrap();
        let builder = agent(&node, "builder", labels(&[("pool", "build")])).await;
        let eu = agent(&node, "eu-1", labels(&[("pool", "deploy"), ("environment", "staging,production"), ("region", "eu")])).await;
        let us = agent(&node, "us-1", labels(&[("pool", "deploy"), ("environment", "staging"), ("region", "us")])).await;
        agent(&node, "prod-only", labels(&[("pool", "deploy"), ("environment", "production"), ("region", "eu")])).await;
        let first = built(&node, pipeline_id, builder, "a").await;
        let second = built(&node, pipeline_id, builder, "b").await;

        let controller = Controller::new(node.clone());
        controller.round().await.unwrap();
        let rollout = deployment(&node, first).rollout.expect("the first deployment rolls out");
        // The pipeline's region waves: us first, then the others; only this environment's hosts.
        assert_eq!(rollout.hosts.iter().map(|host| host.agent_id).collect::<Vec<_>>(), vec![us, eu]);
        assert_eq!(rollout.artifact_digest, "a".repeat(64));
        assert_eq!(rollout.previous, None);
        assert!(deployment(&node, second).rollout.is_none(), "the second waits for the first");

        // The first ends (here: cancelled before its hosts did anything); the second goes next
        // and replaces nothing, since the first never succeeded.
        apply(&node, Command::AbortRollout { deployment_id: first, reason: "test".into() }).await;
        for _ in 0..3 {
            controller.round().await.unwrap();
        }
        assert_eq!(deployment(&node, first).status, DeploymentStatus::RolledBack);
        let rollout = deployment(&node, second).rollout.expect("the second rolls out once the first ended");
        assert_eq!(rollout.artifact_digest, "b".repeat(64));
        assert_eq!(rollout.previous, None);

        // With no deploy agent for its environment, a deployment fails with what to do.
        let patch = PipelinePatch { environment: Some("testing".into()), ..PipelinePatch::default() };
        apply(&node, Command::UpdatePipeline { pipeline_id, patch }).await;
        let create = Command::CreateDeployment {
            pipeline_id,
            commit_hash: "c".into(),
            environment: "testing".into(),
            config_overrides: BTreeMap::new(),
            rollback_of: None,
            branch: None,
            release_of: Some(second),
        };
        let orphan = apply(&node, create).await.unwrap();
        controller.round().await.unwrap();
        let failed = deployment(&node, orphan);
        assert_eq!(failed.status, DeploymentStatus::Failed);
        assert!(failed.status_reason.unwrap().contains("pool=deploy and environment=testing"));
    }
}
