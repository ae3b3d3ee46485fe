//! The rows of the replicated state: one struct per table of the client's data model (seed.txt)
//! plus what the design adds (API tokens, environments, agents, jobs). Fields are only added,
//! with `#[serde(default)]`, never renamed: stored bytes must keep decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, stamped by the leader.
pub type Timestamp = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Developer,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub user_id: u64,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub role: Role,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub token_id: u64,
    pub user_id: u64,
    pub name: String,
    /// SHA-256 of the token; the token itself is shown once and never stored.
    pub token_hash: String,
    pub created_at: Timestamp,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScmType {
    Github,
    Gitlab,
    Bitbucket,
    /// A plain git server (self-hosted, no provider API): polled with `git ls-remote`; it sends
    /// no webhooks Davit reads and has no commit-status API.
    Git,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    pub repo_id: u64,
    pub name: String,
    pub repo_url: String,
    pub branch: String,
    pub scm_type: ScmType,
    /// Sealed (encrypted) by the API layer before it is proposed; never stored in clear.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    #[serde(default)]
    pub user_id: Option<u64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The provider's API base URL (GitHub Enterprise `https://host/api/v3`, self-managed GitLab
    /// `https://host/api/v4`); `None` means the provider's public API (`scm::status::default_api_base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// The provider access token commit statuses are sent with. Sealed (encrypted) by the API
    /// layer before it is proposed, like `webhook_secret`; never stored or returned in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// How often the leader polls the repository with `git ls-remote`, in seconds; `Some(0)`
    /// never. `None` follows the node's `[scm] poll_interval_seconds` when the repository has no
    /// webhook secret, and does not poll when it has one (see `scm::polling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_seconds: Option<u64>,
}

impl Repository {
    /// Whether the repository's server tells Davit about changes by webhook (a provider with a
    /// webhook secret set); otherwise it is polled by default.
    pub fn receives_webhooks(&self) -> bool {
        self.webhook_secret.is_some() && self.scm_type != ScmType::Git
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployStrategy {
    #[serde(rename = "blue-green")]
    BlueGreen,
    #[serde(rename = "canary")]
    Canary,
    #[serde(rename = "rolling")]
    Rolling,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    pub pipeline_id: u64,
    pub name: String,
    pub repo_id: u64,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub build_command: Option<String>,
    pub deploy_strategy: DeployStrategy,
    pub environment: String,
    pub is_active: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default)]
    pub build: BuildSettings,
    /// How the pipeline's releases roll out to the environment's deploy agents.
    #[serde(default, skip_serializing_if = "DeploySettings::is_unset")]
    pub deploy: DeploySettings,
}

/// How a pipeline's releases run on the environment's deploy agents and roll out. Every field
/// is optional; defaults are in the accessors. Without `public_port` the pipeline only builds
/// (its deployments succeed when the build does).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySettings {
    /// The service's port on every deploy host, owned by the agent's traffic switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    /// The port the release listens on inside its container (default 8080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_port: Option<u16>,
    /// What to release: `image` (the image the build exported) or `files` (the build's files
    /// artifact, run by `start_command` in `run_image`). Default: `image` when the pipeline
    /// builds a Dockerfile, otherwise `files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_command: Option<String>,
    /// HTTP path of the health check (2xx/3xx is healthy); a TCP connect when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// A release without a health verdict this long after it started is unhealthy (default 120 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_deadline_seconds: Option<u64>,
    /// Rolling: hosts per batch (default 1), or a percentage of the hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_percent: Option<u8>,
    /// Rolling: hosts being updated at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
    /// Blue-green: how long the old release stays warm after the switch (default 300 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_old_seconds: Option<u64>,
    /// Canary: percent of traffic at each step (default 10, 50, 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_steps: Option<Vec<u8>>,
    /// Canary: how long each step is observed before its verdict (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_window_seconds: Option<u64>,
    /// Canary: a step fails when more than this percent of its requests answer 5xx (default 5),
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_percent: Option<u32>,
    /// or when its 95th percentile latency is above this (default: not judged),
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_p95_ms: Option<u64>,
    /// and is inconclusive with fewer requests than this (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// Canary: what an inconclusive step does: `rollback` (default) or `wait` (one more window
    /// at a time, for at most `max_wait_seconds`, default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_inconclusive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_seconds: Option<u64>,
    /// Region waves: regions in rollout order (others follow, by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
    /// Release container limits (default 1000 millicpus = 1 CPU, 2048 MB, the seed's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Images of this many recent releases are kept on each host (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_images: Option<u32>,
}

impl DeploySettings {
    pub fn is_unset(&self) -> bool {
        *self == DeploySettings::default()
    }

    /// Whether deployments roll out to hosts (otherwise they only build).
    pub fn rolls_out(&self) -> bool {
        self.public_port.is_some()
    }
}

/// How a pipeline builds: the container image, the steps after `build_command`, what the build
/// produces, and how its jobs are scheduled. Every field is optional; defaults are below.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSettings {
    /// Container image of the build steps (default [`DEFAULT_BUILD_IMAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_command: Option<String>,
    /// Workspace-relative paths (files or directories) packed into the build's artifact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// A Dockerfile in the repository to build into an image, exported as an artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Retries after an infrastructure failure (a lost agent); default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// At most this many builds of the pipeline run at once; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Labels an agent must have to run the pipeline's builds (besides `pool=build`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_labels: BTreeMap<String, String>,
    /// Which source-control events start runs of the pipeline; `None` means
    /// [`DEFAULT_TRIGGER_EVENTS`] (pushes and pull requests, not tags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_events: Option<Vec<TriggerEvent>>,
    /// Pull requests deploy into an environment of their own, `pr-<number>`, removed when the
    /// pull request is closed or merged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview_environments: bool,
}

impl BuildSettings {
    /// Whether source-control events of this kind start runs of the pipeline.
    pub fn triggers_on(&self, event: TriggerEvent) -> bool {
        self.trigger_events.as_deref().unwrap_or(DEFAULT_TRIGGER_EVENTS).contains(&event)
    }
}

/// A kind of source-control event a pipeline can be started by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerEvent {
    Push,
    Tag,
    PullRequest,
}

impl TriggerEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerEvent::Push => "push",
            TriggerEvent::Tag => "tag",
            TriggerEvent::PullRequest => "pull_request",
        }
    }
}

/// Tags start nothing unless a pipeline asks for them: a tag usually marks a commit its branch
/// pipeline has already built.
pub const DEFAULT_TRIGGER_EVENTS: &[TriggerEvent] = &[TriggerEvent::Push, TriggerEvent::PullRequest];

pub const DEFAULT_BUILD_IMAGE: &str = "davit/build-base:latest";
pub const DEFAULT_BUILD_TIMEOUT_SECONDS: u64 = 3600;
pub const DEFAULT_MAX_RETRIES: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    Pending,
    InProgress,
    Success,
    Failed,
    RolledBack,
}

impl DeploymentStatus {
    pub fn is_final(self) -> bool {
        matches!(self, DeploymentStatus::Success | DeploymentStatus::Failed | DeploymentStatus::RolledBack)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub deployment_id: u64,
    pub pipeline_id: u64,
    pub commit_hash: String,
    pub status: DeploymentStatus,
    pub environment: String,
    #[serde(default)]
    pub start_time: Option<Timestamp>,
    #[serde(default)]
    pub end_time: Option<Timestamp>,
    #[serde(default)]
    pub triggered_by: Option<u64>,
    #[serde(default)]
    pub rollback_of: Option<u64>,
    #[serde(default)]
    pub config_overrides: BTreeMap<String, String>,
    /// Why the deployment ended as it did (failure, cancellation), when not plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The source-control event that started the run, when one did (not a person or rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scm: Option<ScmOrigin>,
    /// How many progress events the deployment has ([`DeploymentEvent::seq`] of the last).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events: u64,
    /// The rollout to the environment's hosts, once it began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Box<Rollout>>,
    /// The pipeline rolled its releases out to hosts when the deployment was created: it ends
    /// with its rollout, not with its build.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolls_out: bool,
    /// The branch deployed, when the deployment names one (a branch deployment, a push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The deployment whose build this one releases again (a promotion, a rollback): nothing
    /// is rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_of: Option<u64>,
    /// Approvals this deployment waits for before it rolls out (developers', or one admin's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_approvals: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    /// When the deployed commit was made (its committer time, Unix ms), as the build's checkout
    /// reported it; a promotion or rollback carries its source's. The start of lead time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<Timestamp>,
}

impl Deployment {
    /// Whether the approvals it needs have been given.
    pub fn approved(&self) -> bool {
        match self.required_approvals {
            None => true,
            Some(needed) => {
                self.approvals.iter().any(|approval| approval.role == Role::Admin)
                    || self.approvals.iter().filter(|approval| approval.role == Role::Developer).count() as u32 >= needed
            }
        }
    }
}

/// A deployment's rollout: what runs where, and the planner's replicated facts. Only `apply`
/// changes it (`Command::StartRollout`, `Command::RolloutStep` and the results of release
/// jobs), so a new leader's controller resumes from exactly what the old one recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The service on each host (`<pipeline>-<environment>`) and this release of it (`d<id>`).
    pub service: String,
    pub release: String,
    /// The release that served the environment before, which takes back the traffic on rollback.
    #[serde(default)]
    pub previous: Option<String>,
    pub artifact_digest: String,
    pub artifact_kind: String,
    pub hosts: Vec<RolloutHost>,
    /// The planner's facts (`now` is not kept: the controller sets it each round).
    pub facts: crate::deploy::plan::Facts,
    /// Bumped by every change of the facts; a `RolloutStep` planned from older facts is refused.
    pub version: u64,
    /// The environment's configuration when the rollout began (secrets sealed, as stored):
    /// what every release job of the rollout gets, and what a rollback to it gets again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config: Vec<Configuration>,
    /// What each host runs, as the release jobs are given it.
    pub run: crate::release_spec::RunSettings,
    pub health: crate::release_spec::HealthCheck,
    /// The canary step under analysis: each host's counters as they arrive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<HostTraffic>,
    pub started_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutHost {
    pub agent_id: u64,
    pub name: String,
    #[serde(default)]
    pub region: Option<String>,
    /// The release job in flight for this host, if any.
    #[serde(default)]
    pub job: Option<u64>,
    /// Failed attempts at the current step of a rollback or cleanup (moving traffic back,
    /// stopping a release) on this host; the step is tried again until
    /// `UNWIND_ATTEMPTS`, or until the agent is lost, before the host is given up.
    #[serde(default)]
    pub unwind_failures: u32,
}

/// One host's traffic counters over an analysis window (from its `stats` release job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTraffic {
    pub agent_id: u64,
    pub step: usize,
    pub requests: u64,
    pub server_errors: u64,
    /// 95th percentile latency in microseconds (integral, so records stay `Eq`).
    pub latency_p95_us: u64,
    pub stable_requests: u64,
    pub stable_server_errors: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// One step of a deployment's progress (host started, healthy, switched, weight changed,
/// analysis verdict, rolled back, ...), as `GET /api/v1/deployments/{id}/events` streams it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentEvent {
    pub deployment_id: u64,
    /// 1, 2, 3, ... within the deployment: the Server-Sent Events id (`Last-Event-ID`).
    pub seq: u64,
    /// Unix milliseconds.
    pub at: Timestamp,
    /// What happened, one of [`event_kind`]'s names.
    pub kind: String,
    /// The deploy agent (host) it happened on, for host events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Percent of the host's traffic on the new release, for weight changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    pub message: String,
}

/// The kinds of [`DeploymentEvent`].
pub mod event_kind {
    /// The deployment was created and waits (for its build, an approval, or an earlier
    /// deployment to the same environment).
    pub const QUEUED: &str = "queued";
    /// The rollout began (hosts, strategy and release are in the message).
    pub const ROLLOUT_STARTED: &str = "rollout_started";
    /// The environment is protected: the deployment waits for approvals.
    pub const APPROVAL_REQUIRED: &str = "approval_required";
    pub const APPROVED: &str = "approved";
    pub const HOST_STARTED: &str = "host_started";
    pub const HOST_HEALTHY: &str = "host_healthy";
    pub const HOST_UNHEALTHY: &str = "host_unhealthy";
    pub const HOST_FAILED: &str = "host_failed";
    /// A host's traffic moved (`weight` percent on the new release).
    pub const WEIGHT_CHANGED: &str = "weight_changed";
    /// All of a host's traffic is on the new release.
    pub const HOST_SWITCHED: &str = "host_switched";
    pub const CANARY_STEP: &str = "canary_step";
    pub const ANALYSIS_VERDICT: &str = "analysis_verdict";
    pub const ROLLBACK_STARTED: &str = "rollback_started";
    pub const OLD_STOPPED: &str = "old_stopped";
    pub const NEW_STOPPED: &str = "new_stopped";
    /// The deployment ended: `succeeded`, `failed` or `rolled_back`.
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const ROLLED_BACK: &str = "rolled_back";
}

/// Where a run started by source control came from. The commit-status reporter reads
/// `head_commit` (the commit the provider shows the status on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScmOrigin {
    pub repo_id: u64,
    /// `webhook` or `poll`.
    pub source: String,
    /// `push`, `tag` or `pull_request`.
    pub event: String,
    /// The ref that moved: `refs/heads/<branch>`, `refs/tags/<tag>`, or for a pull request the
    /// ref its checks run on (the provider's merge ref, or the source branch where there is none).
    pub git_ref: String,
    /// The pushed commit, or the pull request's head commit.
    pub head_commit: String,
    #[serde(default)]
    pub pull_request: Option<u64>,
    /// The provider's delivery id, for a webhook that sent one.
    #[serde(default)]
    pub delivery: Option<String>,
}

/// An environment with a record of its own: today the preview environments of pull requests
/// (`pr-<number>`), created by their first run and deleted when the pull request closes. Other
/// environments exist simply by being named by pipelines, deployments and configurations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    pub name: String,
    /// Protection, promotion source and strategy default, as an admin set them.
    #[serde(default, skip_serializing_if = "EnvironmentSettings::is_unset")]
    pub settings: EnvironmentSettings,
    /// The pipelines and pull requests whose preview lives here. Two repositories can both have
    /// a pull request #7, so the record goes away only when the last of them closes.
    #[serde(default)]
    pub previews: Vec<PreviewOwner>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// How an environment is protected and fed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentSettings {
    /// Deployments here release only what succeeded in this environment first (the same
    /// commit of the same pipeline; its artifact is deployed again, never rebuilt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_from: Option<String>,
    /// Deployments here wait for this many developers' approvals, or one admin's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_approvals: Option<u32>,
    /// Deployments here must come from a branch matching one of these patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_branches: Option<Vec<String>>,
    /// The strategy of rollouts here, over the pipeline's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<DeployStrategy>,
}

impl EnvironmentSettings {
    pub fn is_unset(&self) -> bool {
        *self == EnvironmentSettings::default()
    }
}

/// The environments every cluster has, whether or not anything names them yet.
pub const DEFAULT_ENVIRONMENTS: [&str; 4] = ["development", "testing", "staging", "production"];

/// One person's approval of a deployment to a protected environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub user_id: u64,
    pub username: String,
    pub role: Role,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewOwner {
    pub repo_id: u64,
    pub pipeline_id: u64,
    pub pull_request: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub artifact_id: u64,
    pub pipeline_id: u64,
    pub version: String,
    /// Where the bytes live in the blob store (content-addressed by `digest`).
    pub artifact_path: String,
    /// SHA-256 of the uncompressed bytes, lower-case hex.
    pub digest: String,
    pub size_bytes: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The commit built, when a build produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_hash: Option<String>,
    /// The deployment (run) and job that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    /// What the artifact is: `files` (paths of the workspace) or `image` (a `docker save`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    pub config_id: u64,
    pub environment: String,
    pub key: String,
    /// For a secret, the sealed (encrypted) value; the API never returns it in clear.
    pub value: String,
    pub is_secret: bool,
    #[serde(default)]
    pub pipeline_id: Option<u64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Metadata of one stored log segment; the lines themselves live in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSegment {
    pub deployment_id: u64,
    pub job_id: u64,
    pub sequence: u64,
    pub blob_key: String,
    pub bytes: u64,
    pub lines: u64,
    pub error_lines: u64,
    pub first_timestamp: Timestamp,
    pub last_timestamp: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationType {
    Email,
    Slack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub notification_id: u64,
    pub user_id: u64,
    #[serde(rename = "type")]
    pub notification_type: NotificationType,
    pub target: String,
    pub events: Vec<String>,
    pub is_active: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One entry of the hash-chained audit log: `hash = sha256(previous_hash || entry)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    pub audit_id: u64,
    #[serde(default)]
    pub user_id: Option<u64>,
    pub action: String,
    pub details: String,
    pub timestamp: Timestamp,
    pub log_index: u64,
    pub previous_hash: String,
    pub hash: String,
    /// Where the request came from (client address), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A token an admin hands to the operators of a fleet: `davit-agent register` exchanges it for
/// a per-agent credential. Reusable until it expires or is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationToken {
    pub token_id: u64,
    pub description: String,
    /// SHA-256 of the token; the token itself is shown once.
    pub token_hash: String,
    #[serde(default)]
    pub created_by: Option<u64>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(default)]
    pub revoked_at: Option<Timestamp>,
    #[serde(default)]
    pub agents_registered: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Registered but never connected, or deregistered.
    #[default]
    Offline,
    Online,
    /// Finishing its jobs; takes no new ones.
    Draining,
    /// Missed its heartbeats past the grace; its jobs were retried elsewhere.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub agent_id: u64,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// SHA-256 of the agent's credential.
    pub credential_hash: String,
    pub registered_at: Timestamp,
    #[serde(default)]
    pub deregistered_at: Option<Timestamp>,
    #[serde(default)]
    pub state: AgentState,
    /// Concurrent jobs the agent runs.
    #[serde(default)]
    pub capacity: u32,
    /// Executors the agent has (`docker`, `shell`).
    #[serde(default)]
    pub executors: Vec<String>,
    #[serde(default)]
    pub version: String,
    /// The coordinator holding the agent's session.
    #[serde(default)]
    pub node_id: Option<u64>,
    #[serde(default)]
    pub connected_at: Option<Timestamp>,
    /// Why the agent is in its state (for `lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub agent_id: u64,
    /// The fencing token: reports carrying an older attempt are refused.
    pub attempt: u32,
    pub expires_at: Timestamp,
    /// The agent accepted the offer and started the job.
    #[serde(default)]
    pub accepted_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

/// One step of a job (checkout, build, test, package, artifacts), as the agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub index: u32,
    pub name: String,
    pub state: StepState,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub exit_code: Option<i64>,
}

/// One attempt of a job on one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub agent_id: u64,
    pub assigned_at: Timestamp,
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
    /// How it ended: succeeded, failed, infrastructure, cancelled, lost.
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: u64,
    pub deployment_id: u64,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Executor-specific description (image, command, environment), opaque to the state machine.
    #[serde(default)]
    pub spec: serde_json::Value,
    pub status: JobStatus,
    pub attempt: u32,
    pub max_attempts: u32,
    #[serde(default)]
    pub lease: Option<Lease>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default)]
    pub pipeline_id: u64,
    /// When the job (re)entered the queue, for wait-time metrics and fair ordering.
    #[serde(default)]
    pub queued_at: Timestamp,
    #[serde(default)]
    pub steps: Vec<StepRecord>,
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// The committer time (Unix ms) of the commit the job checked out, as its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<Timestamp>,
    /// CPU and memory of the job's containers over its last attempt, sampled by its agent from
    /// the Docker engine (absent for shell jobs and from agents that do not sample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceUsage>,
}

/// CPU and memory of a job's containers, from the Docker engine's stats sampled every few
/// seconds while it ran. Integral units keep records `Eq`: CPU in millicores (1000 = one core
/// busy, i.e. 100 %), memory in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    pub samples: u64,
    pub cpu_millicores_peak: u64,
    pub cpu_millicores_mean: u64,
    pub memory_bytes_peak: u64,
    pub memory_bytes_mean: u64,
}
