//! What a job asks the agent to do, as the coordinator writes it into the job record and the
//! offer (`JobOffer.spec_json`). The coordinator builds it with these same types, so the two
//! sides cannot drift apart. Fields are only added, with defaults, never renamed.

use serde::{Deserialize, Serialize};

/// A command step of a build (build, test, package).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandStep {
    pub name: String,
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub pipeline_name: String,
    /// What git clones: https, ssh, git or file URL.
    pub repository_url: String,
    /// The exact commit to build (full or abbreviated SHA).
    pub commit: String,
    #[serde(default)]
    pub branch: Option<String>,
    /// A ref to fetch and build instead of `commit`, such as a pull request's trial merge
    /// `refs/pull/7/merge`: the provider's merge of the request into its target, which has no
    /// commit id until fetched. `commit` stays the pull request's head (what statuses name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_ref: Option<String>,
    /// Image of the build container (the Docker executor; the shell executor ignores it).
    pub image: String,
    pub steps: Vec<CommandStep>,
    /// Workspace-relative paths packed into the `files` artifact.
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// A Dockerfile (workspace-relative) built into an image and exported as the `image` artifact.
    #[serde(default)]
    pub dockerfile: Option<String>,
    pub timeout_seconds: u64,
    /// The version artifacts are recorded under.
    pub artifact_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    Build(BuildSpec),
    /// One step of a rollout on one deploy host (the host's agent is the only one offered it).
    Release(ReleaseSpec),
}

/// One step of a rollout on one deploy host: start, health-check, switch traffic to, or stop a
/// release of a service, or read the traffic switch's counters. The agent keeps, per service, a
/// traffic switch (a reverse proxy owning the service's public port) and the releases running
/// behind it, and persists both under its work directory so that a restarted agent resumes them.
///
/// Every operation is idempotent: repeating one (a retried job, a new leader re-issuing it)
/// changes nothing more, and a weight already in place is not switched again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    pub op: ReleaseOp,
    /// The service on this host (`<pipeline>-<environment>`): one traffic switch per service.
    pub service: String,
    /// The release this step is about, named by the deployment that brought it: `d<id>`.
    pub release: String,
    /// The release that served the service before this deployment, if any: the weight not given
    /// to `release` goes to it, and a rollback returns all traffic to it.
    #[serde(default)]
    pub previous: Option<String>,
    pub artifact: ReleaseArtifact,
    pub run: RunSettings,
    pub health: HealthCheck,
    /// The operation's deadline (fetching and loading an image can take a while).
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ReleaseOp {
    /// Fetch the artifact by digest (verified), load it, and start the release beside whatever
    /// runs, taking no traffic. Fails (outcome failed) when the release cannot start.
    Start,
    /// Probe the started release until it is healthy (`healthy_threshold` successes in a row)
    /// or not (`unhealthy_threshold` failures in a row, or `deadline_ms` without a verdict).
    /// The job succeeds either way; [`ReleaseOutput::health`] holds the verdict.
    CheckHealth,
    /// Send `weight` percent of the service's requests to `release` and the rest to `previous`.
    SetWeight { weight: u8 },
    /// Stop every release of the service other than `release`, once no request is in flight to
    /// them, and remove images beyond the last `keep_images` releases.
    StopOld,
    /// Take `release` out of the switch (its weight goes to `previous`) and stop it.
    StopNew,
    /// Report the switch's counters since `since_ms` (Unix milliseconds).
    Stats { since_ms: i64 },
    /// The service is no longer wanted on this host (its environment went away: a closed pull
    /// request's preview): take its traffic off, stop every release once its requests in flight
    /// are answered, give up the public port, and remove its images, cached artifacts and
    /// recorded state. A service this host does not know is already retired.
    Retire,
}

/// What a release runs: an image exported by a build (`docker save` tar), or a tarball of files
/// mounted in `run.image` and started by `run.command` (or the image's own command).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseArtifact {
    /// SHA-256 of the artifact's uncompressed bytes (fetched with `FetchArtifact`).
    pub digest: String,
    /// `image` or `files`.
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSettings {
    /// The port the release listens on inside its container.
    pub container_port: u16,
    /// The service's public port on the host, owned by the agent's traffic switch (bound on the
    /// agent's configured service address).
    pub public_port: u16,
    /// For a `files` artifact: the image its files run in (mounted at `/release`, the working
    /// directory) and the command (run with `sh -c`). For an `image` artifact, the command
    /// overrides the image's own when given.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Option<String>,
    /// Container limits (the seed's defaults: 1 CPU = 1000 millicpus, 2 GB).
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Images of this many most recent releases of the service are kept; older ones removed.
    pub keep_images: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// An HTTP path answered with 2xx or 3xx when healthy; `None` checks that the port accepts
    /// a TCP connection.
    #[serde(default)]
    pub http_path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Give up (unhealthy) when no verdict was reached this long after the check began.
    pub deadline_ms: u64,
}

/// What a release operation reports (`JobResult.output_json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleaseOutput {
    #[serde(default)]
    pub health: Option<HealthReport>,
    #[serde(default)]
    pub stats: Option<TrafficStats>,
    /// The switch's routing after the operation: release name to percent of requests.
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub healthy: bool,
    /// What the last probes saw (status codes, connection errors, timeouts).
    pub detail: String,
}

/// Requests through the service's switch since `since_ms`: to `release` and to the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficStats {
    pub release: TrafficCounts,
    pub others: TrafficCounts,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficCounts {
    pub requests: u64,
    /// Answers with a 5xx status, including the switch's own 502 when the release did not answer.
    pub server_errors: u64,
    /// 95th percentile of the time to the answer's head, in milliseconds (0 without requests).
    pub latency_p95_ms: f64,
}

pub const CHECKOUT_STEP: &str = "checkout";
pub const IMAGE_STEP: &str = "image";
pub const ARTIFACTS_STEP: &str = "artifacts";

impl JobSpec {
    /// Every step the job reports, in order: checkout, the commands, then the image build and
    /// the artifact upload when the job has them.
    pub fn step_names(&self) -> Vec<String> {
        match self {
            JobSpec::Release(release) => vec![release.op.name().to_string()],
            JobSpec::Build(build) => {
                let mut names = vec![CHECKOUT_STEP.to_string()];
                names.extend(build.steps.iter().map(|step| step.name.clone()));
                if build.dockerfile.is_some() {
                    names.push(IMAGE_STEP.to_string());
                }
                if !build.artifacts.is_empty() || build.dockerfile.is_some() {
                    names.push(ARTIFACTS_STEP.to_string());
                }
                names
            }
        }
    }
}

impl ReleaseOp {
    /// The step name a release job reports.
    pub fn name(&self) -> &'static str {
        match self {
            ReleaseOp::Start => "start",
            ReleaseOp::CheckHealth => "check_health",
            ReleaseOp::SetWeight { .. } => "set_weight",
            ReleaseOp::StopOld => "stop_old",
            ReleaseOp::StopNew => "stop_new",
            ReleaseOp::Stats { .. } => "stats",
            ReleaseOp::Retire => "retire",
        }
    }
}
