//! Typed commands: the only way the replicated state changes. A [`Proposal`] is what goes into
//! the Raft log: the command plus everything `apply` would otherwise have to ask the world
//! for (the time, the acting user), stamped once by the leader.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::records::{
    BuildSettings, DeploySettings, DeployStrategy, DeploymentStatus, EnvironmentSettings, NotificationType, ResourceUsage, Role,
    RolloutHost, ScmType, StepRecord, Timestamp,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Wall-clock time on the leader when it proposed, in milliseconds since the epoch.
    pub time: Timestamp,
    /// The user the command acts for; `None` for the system itself.
    #[serde(default)]
    pub actor: Option<u64>,
    pub command: Command,
    /// Where the request came from (client address), for the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    pub key: String,
    pub value: String,
    #[serde(default)]
    pub is_secret: bool,
}

/// Changes to a repository; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryPatch {
    pub name: Option<String>,
    pub repo_url: Option<String>,
    pub branch: Option<String>,
    pub scm_type: Option<ScmType>,
    /// Sealed by the API layer; `Some("")` clears it.
    pub webhook_secret: Option<String>,
    /// The provider's API base URL; `Some("")` goes back to the provider's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// The provider access token, sealed by the API layer; `Some("")` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// The polling interval in seconds (`Some(0)`: never poll).
    #[serde(default)]
    pub poll_interval_seconds: Option<u64>,
}

/// Changes to a pipeline; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelinePatch {
    pub name: Option<String>,
    pub branch: Option<String>,
    pub build_command: Option<String>,
    pub deploy_strategy: Option<DeployStrategy>,
    pub environment: Option<String>,
    pub is_active: Option<bool>,
    #[serde(default)]
    pub build: Option<BuildSettings>,
    #[serde(default)]
    pub deploy: Option<DeploySettings>,
}

/// The build that produced an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactOrigin {
    pub deployment_id: u64,
    pub job_id: u64,
    pub attempt: u32,
    pub commit_hash: String,
    /// `files` or `image`.
    pub kind: String,
}

/// One job the scheduler leases to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job_id: u64,
    pub agent_id: u64,
    /// Must be the job's next attempt: the scheduler's view was current when it decided.
    pub attempt: u32,
}

/// How an agent says a job attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobEnd {
    Succeeded,
    /// The job's own commands failed: not retried.
    Failed,
    /// The agent could not run it: retried on another agent while attempts remain.
    Infrastructure,
    Cancelled,
}

/// What an agent measured of a job attempt besides its outcome. Agents before these fields
/// send nothing, and the command then carries none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMeasurements {
    /// The committer time of the commit checked out (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<Timestamp>,
    /// CPU and memory of the job's containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceUsage>,
}

impl JobMeasurements {
    pub fn is_empty(&self) -> bool {
        self.commit_time.is_none() && self.resources.is_none()
    }
}

/// How source-control changes reached the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScmSource {
    /// A provider's webhook delivery, with its delivery id when the provider sent one.
    Webhook {
        #[serde(default)]
        delivery: Option<String>,
    },
    /// The poller's `git ls-remote`. A baseline (the first look at a repository) records the
    /// heads it saw and runs nothing: those commits were there before Davit was watching.
    Poll {
        #[serde(default)]
        baseline: bool,
    },
}

impl ScmSource {
    /// The name a run's origin records: `webhook` or `poll`.
    pub fn name(&self) -> &'static str {
        match self {
            ScmSource::Webhook { .. } => "webhook",
            ScmSource::Poll { .. } => "poll",
        }
    }
}

/// What happened to a pull request, as far as runs are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScmPullRequestAction {
    Opened,
    /// New commits on the source branch.
    Synchronized,
    Reopened,
    /// Closed without merging.
    Closed,
    Merged,
}

impl ScmPullRequestAction {
    /// Opened, synchronized and reopened put code up for checks; closing and merging end it.
    pub fn runs_checks(self) -> bool {
        matches!(self, Self::Opened | Self::Synchronized | Self::Reopened)
    }
}

/// One normalized change of a repository, whichever provider (or the poller) reported it.
/// Converted from `scm::events::ScmEvent` in one place, `scm::trigger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScmChange {
    /// A branch moved to `after` (from `before`, `None` for a new branch). Without `refs/heads/`.
    Push {
        branch: String,
        #[serde(default)]
        before: Option<String>,
        after: String,
    },
    /// A tag was created or moved. Without `refs/tags/`.
    Tag { tag: String, commit: String },
    PullRequest {
        number: u64,
        action: ScmPullRequestAction,
        source_branch: String,
        target_branch: String,
        /// The source branch's head; present whenever the action runs checks.
        #[serde(default)]
        head_commit: Option<String>,
        /// The provider's trial merge (`refs/pull/7/merge`, `refs/merge-requests/7/merge`);
        /// none on Bitbucket, where the checks run on `head_commit`.
        #[serde(default)]
        merge_ref: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Several proposals that reached the leader together, written as one Raft entry (one
    /// durable commit) and applied in order, each with its own outcome, audit entry and
    /// events, exactly as if each had been an entry of its own. A rejected one changes
    /// nothing and does not affect the others. Batches do not nest.
    Batch {
        proposals: Vec<Proposal>,
    },
    /// The first command of a new cluster: the key every node signs and checks user tokens
    /// with, drawn by the leader. Applying it again changes nothing.
    InitializeCluster {
        token_signing_key: String,
    },
    CreateUser {
        username: String,
        email: String,
        password_hash: String,
        role: Role,
    },
    UpdateUser {
        user_id: u64,
        email: Option<String>,
        password_hash: Option<String>,
        role: Option<Role>,
        #[serde(default)]
        username: Option<String>,
    },
    /// A login attempt, successful or not: audited, and failures count towards the lockout.
    RecordLogin {
        username: String,
        user_id: Option<u64>,
        succeeded: bool,
    },
    DeleteUser {
        user_id: u64,
    },
    CreateApiToken {
        user_id: u64,
        name: String,
        token_hash: String,
        expires_at: Option<Timestamp>,
    },
    RevokeApiToken {
        token_id: u64,
    },
    ConnectRepository {
        name: String,
        repo_url: String,
        branch: String,
        scm_type: ScmType,
        webhook_secret: Option<String>,
        /// The provider's API base URL; `None` for the provider's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_url: Option<String>,
        /// The provider access token, sealed by the API layer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access_token: Option<String>,
        /// See `Repository::poll_interval_seconds`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        poll_interval_seconds: Option<u64>,
    },
    UpdateRepository {
        repo_id: u64,
        patch: RepositoryPatch,
    },
    DeleteRepository {
        repo_id: u64,
    },
    CreatePipeline {
        name: String,
        repo_id: u64,
        branch: Option<String>,
        build_command: Option<String>,
        deploy_strategy: DeployStrategy,
        environment: String,
        #[serde(default)]
        build: BuildSettings,
        #[serde(default)]
        deploy: DeploySettings,
    },
    UpdatePipeline {
        pipeline_id: u64,
        patch: PipelinePatch,
    },
    DeletePipeline {
        pipeline_id: u64,
    },
    /// A deployment of a commit (or, with `release_of`, of what an earlier deployment built).
    /// Refused when the environment's protection does not allow it (branch, promotion source).
    CreateDeployment {
        pipeline_id: u64,
        commit_hash: String,
        environment: String,
        config_overrides: BTreeMap<String, String>,
        rollback_of: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        branch: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release_of: Option<u64>,
    },
    SetDeploymentStatus {
        deployment_id: u64,
        status: DeploymentStatus,
        #[serde(default)]
        reason: Option<String>,
    },
    RecordArtifact {
        pipeline_id: u64,
        version: String,
        artifact_path: String,
        digest: String,
        size_bytes: u64,
        /// Set when a build job produced it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        produced_by: Option<ArtifactOrigin>,
    },
    DeleteArtifact {
        artifact_id: u64,
    },
    SetConfigurations {
        environment: String,
        pipeline_id: Option<u64>,
        entries: Vec<ConfigEntry>,
    },
    DeleteConfiguration {
        environment: String,
        pipeline_id: Option<u64>,
        key: String,
    },
    RecordLogSegment {
        deployment_id: u64,
        job_id: u64,
        sequence: u64,
        blob_key: String,
        bytes: u64,
        lines: u64,
        error_lines: u64,
        first_timestamp: Timestamp,
        last_timestamp: Timestamp,
    },
    CreateNotification {
        user_id: u64,
        notification_type: NotificationType,
        target: String,
        events: Vec<String>,
    },
    DeleteNotification {
        notification_id: u64,
    },
    RegisterAgent {
        name: String,
        labels: BTreeMap<String, String>,
        credential_hash: String,
        /// SHA-256 of the registration token the agent presented; it must be valid.
        #[serde(default)]
        registration_token_hash: String,
    },
    CreateRegistrationToken {
        description: String,
        token_hash: String,
        expires_at: Timestamp,
    },
    RevokeRegistrationToken {
        token_id: u64,
    },
    /// An agent opened a session with coordinator `node_id` (or changed its draining flag).
    AgentConnected {
        agent_id: u64,
        node_id: u64,
        labels: BTreeMap<String, String>,
        capacity: u32,
        executors: Vec<String>,
        draining: bool,
        version: String,
    },
    /// The leader has not heard from the agent past the grace: its running jobs are retried
    /// on other agents (or failed when no attempts remain).
    AgentLost {
        agent_id: u64,
        reason: String,
    },
    /// The scheduler's decisions of one round.
    AssignJobs {
        assignments: Vec<Assignment>,
        lease_expires_at: Timestamp,
    },
    /// The agent took the offer and started the job.
    AcceptJob {
        job_id: u64,
        agent_id: u64,
        attempt: u32,
    },
    RecordStep {
        job_id: u64,
        attempt: u32,
        step: StepRecord,
    },
    /// The agent's final report on an attempt; refused unless it is the current lease's.
    FinishJob {
        job_id: u64,
        attempt: u32,
        end: JobEnd,
        reason: Option<String>,
        /// What the job reported besides its outcome (a release step's `ReleaseOutput` JSON).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        /// What the agent measured: the commit's time, its containers' CPU and memory.
        #[serde(default, skip_serializing_if = "JobMeasurements::is_empty")]
        measured: JobMeasurements,
    },
    DeregisterAgent {
        agent_id: u64,
    },
    EnqueueJob {
        deployment_id: u64,
        name: String,
        labels: BTreeMap<String, String>,
        spec: serde_json::Value,
        max_attempts: u32,
    },
    /// Lease a queued job to an agent. `attempt` must be the job's next attempt: the
    /// scheduler's view was current when it decided.
    AssignJob {
        job_id: u64,
        agent_id: u64,
        attempt: u32,
        lease_expires_at: Timestamp,
    },
    RenewLease {
        job_id: u64,
        agent_id: u64,
        attempt: u32,
        lease_expires_at: Timestamp,
    },
    /// The agent's final report. Refused unless `attempt` is the current lease's attempt.
    CompleteJob {
        job_id: u64,
        attempt: u32,
        succeeded: bool,
        failure_reason: Option<String>,
    },
    /// The leader saw the lease run out: retry the job or fail it.
    ExpireLease {
        job_id: u64,
        attempt: u32,
        #[serde(default)]
        reason: Option<String>,
    },
    CancelJob {
        job_id: u64,
        reason: String,
    },
    /// Changes of a connected repository seen by a webhook or the poller: de-duplicated (by
    /// delivery id for 72 hours, and by the last head recorded per ref), then matched against the
    /// repository's active pipelines; each match becomes a deployment, as `CreateDeployment`
    /// would make it. Pull request closes tear down their preview environments.
    RecordScmChanges {
        repo_id: u64,
        source: ScmSource,
        changes: Vec<ScmChange>,
    },
    /// Append progress events to a deployment (numbered on from its last one, timed by the
    /// proposal). The rollout's own commands append theirs as they apply.
    RecordDeploymentEvents {
        deployment_id: u64,
        events: Vec<NewDeploymentEvent>,
    },
    /// Create or change an environment's settings.
    SetEnvironment {
        name: String,
        settings: EnvironmentSettings,
    },
    /// Undo a rollout under way (a person's cancel, or a global abort of region waves): all
    /// traffic goes back to the previous release and the deployment ends `rolled_back`.
    /// Refused once the rollout has committed (roll back with a new deployment then).
    AbortRollout {
        deployment_id: u64,
        reason: String,
    },
    /// The proposal's actor approves a deployment waiting for approvals.
    ApproveDeployment {
        deployment_id: u64,
    },
    /// Begin a deployment's rollout on these hosts (in rollout order) with this artifact; the
    /// leader's controller chose them from the agents and artifacts it saw. Refused when the
    /// deployment ended or already rolls out.
    StartRollout {
        deployment_id: u64,
        hosts: Vec<RolloutHost>,
        artifact_digest: String,
        artifact_kind: String,
        previous: Option<String>,
        /// The configuration rows the release runs with (secrets sealed).
        #[serde(default)]
        config: Vec<super::records::Configuration>,
    },
    /// Carry out the planner's actions for a rollout whose facts are at `version` (refused as
    /// a conflict when they moved on meanwhile: the controller plans again from the new facts).
    RolloutStep {
        deployment_id: u64,
        version: u64,
        actions: Vec<crate::deploy::plan::Action>,
    },
}

/// A [`crate::state::records::DeploymentEvent`] before it has a number and a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDeploymentEvent {
    pub kind: String,
    #[serde(default)]
    pub host: Option<u64>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub weight: Option<u8>,
    pub message: String,
}

impl NewDeploymentEvent {
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        NewDeploymentEvent { kind: kind.to_string(), host: None, region: None, weight: None, message: message.into() }
    }
}

impl Command {
    /// The audit log's name for the action.
    pub fn action(&self) -> &'static str {
        match self {
            Command::Batch { .. } => "batch",
            Command::InitializeCluster { .. } => "cluster.initialize",
            Command::CreateUser { .. } => "user.create",
            Command::UpdateUser { .. } => "user.update",
            Command::RecordLogin { succeeded: true, .. } => "auth.login",
            Command::RecordLogin { succeeded: false, .. } => "auth.login_failed",
            Command::DeleteUser { .. } => "user.delete",
            Command::CreateApiToken { .. } => "api_token.create",
            Command::RevokeApiToken { .. } => "api_token.revoke",
            Command::ConnectRepository { .. } => "repository.connect",
            Command::UpdateRepository { .. } => "repository.update",
            Command::DeleteRepository { .. } => "repository.delete",
            Command::CreatePipeline { .. } => "pipeline.create",
            Command::UpdatePipeline { .. } => "pipeline.update",
            Command::DeletePipeline { .. } => "pipeline.delete",
            Command::CreateDeployment { .. } => "deployment.create",
            Command::SetDeploymentStatus { .. } => "deployment.status",
            Command::RecordArtifact { .. } => "artifact.record",
            Command::DeleteArtifact { .. } => "artifact.delete",
            Command::SetConfigurations { .. } => "configuration.set",
            Command::DeleteConfiguration { .. } => "configuration.delete",
            Command::RecordLogSegment { .. } => "log.segment",
            Command::CreateNotification { .. } => "notification.create",
            Command::DeleteNotification { .. } => "notification.delete",
            Command::RegisterAgent { .. } => "agent.register",
            Command::CreateRegistrationToken { .. } => "agent.registration_token.create",
            Command::RevokeRegistrationToken { .. } => "agent.registration_token.revoke",
            Command::AgentConnected { .. } => "agent.connect",
            Command::AgentLost { .. } => "agent.lost",
            Command::AssignJobs { .. } => "job.assign",
            Command::AcceptJob { .. } => "job.accept",
            Command::RecordStep { .. } => "job.step",
            Command::FinishJob { .. } => "job.finish",
            Command::DeregisterAgent { .. } => "agent.deregister",
            Command::EnqueueJob { .. } => "job.enqueue",
            Command::AssignJob { .. } => "job.assign",
            Command::RenewLease { .. } => "job.renew_lease",
            Command::CompleteJob { .. } => "job.complete",
            Command::ExpireLease { .. } => "job.expire_lease",
            Command::CancelJob { .. } => "job.cancel",
            Command::RecordDeploymentEvents { .. } => "deployment.events",
            Command::StartRollout { .. } => "deployment.rollout_start",
            Command::SetEnvironment { .. } => "environment.update",
            Command::ApproveDeployment { .. } => "deployment.approve",
            Command::AbortRollout { .. } => "deployment.abort",
            Command::RolloutStep { .. } => "deployment.rollout_step",
            Command::RecordScmChanges { .. } => "scm.changes",
        }
    }

    /// Whether the action is recorded in the audit log. High-volume machine traffic (log
    /// segments, lease renewals) is not: it would drown out what people did.
    pub fn is_audited(&self) -> bool {
        !matches!(
            self,
            Command::Batch { .. }
                | Command::RecordLogSegment { .. }
                | Command::RenewLease { .. }
                | Command::AssignJobs { .. }
                | Command::AcceptJob { .. }
                | Command::RecordStep { .. }
                | Command::AgentConnected { .. }
                | Command::RecordDeploymentEvents { .. }
                | Command::RolloutStep { .. }
        )
    }

    /// A summary for the audit log that never contains a secret value or a password hash.
    pub fn audit_details(&self) -> String {
        match self {
            Command::Batch { .. } | Command::InitializeCluster { .. } => String::new(),
            Command::CreateUser { username, role, .. } => {
                format!("username={username} role={role:?}")
            }
            Command::RecordLogin { username, .. } => format!("username={username}"),
            Command::UpdateRepository { repo_id, patch } => format!(
                "repo_id={repo_id} name={:?} repo_url={:?} branch={:?} webhook_secret_changed={} api_url={:?} access_token_changed={} poll_interval_seconds={:?}",
                patch.name,
                patch.repo_url,
                patch.branch,
                patch.webhook_secret.is_some(),
                patch.api_url,
                patch.access_token.is_some(),
                patch.poll_interval_seconds
            ),
            Command::UpdateUser { user_id, role, password_hash, .. } => {
                format!("user_id={user_id} role={role:?} password_changed={}", password_hash.is_some())
            }
            Command::CreateApiToken { user_id, name, .. } => {
                format!("user_id={user_id} name={name}")
            }
            Command::ConnectRepository { repo_url, branch, scm_type, api_url, access_token, .. } => {
                format!(
                    "repo_url={repo_url} branch={branch} scm_type={scm_type:?} api_url={api_url:?} access_token_set={}",
                    access_token.is_some()
                )
            }
            Command::SetConfigurations { environment, pipeline_id, entries } => {
                let keys: Vec<&str> = entries.iter().map(|entry| entry.key.as_str()).collect();
                format!("environment={environment} pipeline_id={pipeline_id:?} keys={}", keys.join(","))
            }
            Command::CreatePipeline { name, repo_id, .. } => {
                format!("name={name} repo_id={repo_id}")
            }
            Command::CreateDeployment { pipeline_id, commit_hash, environment, .. } => {
                format!("pipeline_id={pipeline_id} commit={commit_hash} environment={environment}")
            }
            Command::RegisterAgent { name, labels, .. } => format!("name={name} labels={labels:?}"),
            Command::CreateRegistrationToken { description, expires_at, .. } => {
                format!("description={description} expires_at={expires_at}")
            }
            Command::EnqueueJob { deployment_id, name, .. } => format!("deployment_id={deployment_id} name={name}"),
            Command::RecordScmChanges { repo_id, source, changes } => {
                let delivery = match source {
                    ScmSource::Webhook { delivery } => format!(" delivery={delivery:?}"),
                    ScmSource::Poll { baseline } => format!(" baseline={baseline}"),
                };
                format!("repo_id={repo_id} source={}{delivery} changes={}", source.name(), changes.len())
            }
            other => {
                // Everything else carries ids and enums only.
                let mut json = serde_json::to_value(other).unwrap_or_default();
                if let Some(object) = json.as_object_mut() {
                    object.remove("type");
                }
                json.to_string()
            }
        }
    }
}

/// What applying a proposal produced. A rejection is a normal, deterministic outcome (every
/// replica rejects alike), not a storage failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub result: Result<Applied, Rejection>,
    /// For a [`Command::Batch`]: the outcome of each of its proposals, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch: Vec<Outcome>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The id of the row created or changed, if one.
    pub id: Option<u64>,
    /// How many rows were written or deleted.
    pub affected: u64,
    /// For [`Command::RecordScmChanges`]: what each change started, or why it started nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scm: Option<ScmReport>,
    /// Deployments that got new progress events (for their followers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub progressed: Vec<u64>,
}

/// What a [`Command::RecordScmChanges`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScmReport {
    /// The webhook delivery id was seen in the last 72 hours: nothing was done.
    pub duplicate: bool,
    /// One entry per change, in the command's order (empty for a duplicate).
    pub changes: Vec<ScmChangeReport>,
    /// Deployments of closed pull requests' preview environments that were cancelled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancelled_deployments: Vec<u64>,
}

impl ScmReport {
    /// Every deployment created, in order.
    pub fn deployments(&self) -> Vec<u64> {
        self.changes.iter().flat_map(|change| change.deployments.iter().copied()).collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScmChangeReport {
    /// The deployments (runs) the change created, one per matching pipeline.
    pub deployments: Vec<u64>,
    /// Why the change started nothing (or, with some deployments, why other pipelines did not run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    NotFound,
    Conflict,
    Invalid,
    StaleAttempt,
    /// A rule of the environment (protection, promotion) refuses it.
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectionCode,
    pub message: String,
}

impl Outcome {
    pub fn applied(id: Option<u64>, affected: u64) -> Self {
        Outcome { result: Ok(Applied { id, affected, ..Applied::default() }), batch: Vec::new() }
    }
    pub fn rejected(code: RejectionCode, message: impl Into<String>) -> Self {
        Outcome { result: Err(Rejection { code, message: message.into() }), batch: Vec::new() }
    }
}
