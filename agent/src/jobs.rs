//! Running one offered job: a fresh workspace, the exact commit checked out, each command step
//! in the executor with its own status and log, then the image build and the artifacts (packed,
//! named by digest, uploaded unless the coordinator already has them). The outcome separates
//! the job's own failures (not retried) from the host's (retried on another agent).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use davit_proto::agent::{self as pb, ArtifactMeta, JobOffer, JobOutcome, StepState, StepUpdate};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::client::Coordinator;
use crate::executor::{ErrorKind, Executor, Limits, StepOutcome, StepRequest};
use crate::job_spec::{ARTIFACTS_STEP, BuildSpec, CHECKOUT_STEP, IMAGE_STEP, JobSpec, ReleaseSpec};
use crate::log_shipping::{LogShipper, now_millis, secrets_of};
use crate::masking::Masker;
use crate::release::{CoordinatorArtifacts, ReleaseError, ReleaseManager};
use crate::upload::{Source, Speculation, upload};

/// Where a job's messages to the coordinator go (the session, whichever it is at the moment).
pub type Messages = mpsc::UnboundedSender<pb::agent_message::Message>;

pub struct JobContext {
    pub offer: JobOffer,
    pub executor: Arc<Executor>,
    pub shipper: LogShipper,
    pub work_dir: PathBuf,
    pub git_protocols: Vec<String>,
    pub messages: Messages,
    pub coordinator: watch::Receiver<Option<Coordinator>>,
    pub cancel: CancellationToken,
    /// The agent's releases and traffic switches (release jobs).
    pub releases: Arc<ReleaseManager>,
}

/// How a job ended, as reported in `JobResult`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub outcome: JobOutcome,
    pub reason: String,
    /// `JobResult.output_json`: what a release step reports; empty for builds.
    pub output: Vec<u8>,
    /// `JobResult.commit_time`: the committer time of the commit a build checked out (Unix ms).
    pub commit_time: Option<i64>,
    /// `JobResult.resources`: CPU and memory of the job's containers.
    pub resources: Option<pb::ResourceUsage>,
}

impl Ended {
    pub(crate) fn new(outcome: JobOutcome, reason: impl Into<String>) -> Self {
        Ended { outcome, reason: reason.into(), output: Vec::new(), commit_time: None, resources: None }
    }
}

struct Run<'a> {
    context: &'a JobContext,
    masker: Arc<Masker>,
    env: Vec<(String, String)>,
    deadline: Instant,
    timeout: Duration,
    /// CPU and memory of the job's step containers.
    usage: crate::resource_usage::UsageRecorder,
}

impl<'a> Run<'a> {
    /// A run of the offered job within `timeout_seconds`, its secrets masked in what it prints.
    fn new(context: &'a JobContext, timeout_seconds: u64) -> Run<'a> {
        let timeout = Duration::from_secs(timeout_seconds.max(1));
        Run {
            context,
            masker: Arc::new(Masker::new(&secrets_of(&context.offer.env))),
            env: job_environment(&context.offer.env),
            deadline: Instant::now() + timeout,
            timeout,
            usage: Default::default(),
        }
    }

    fn step(&self, index: usize, name: &str, state: StepState, started_at: i64, exit_code: i64) {
        let finished = !matches!(state, StepState::Running);
        let update = StepUpdate {
            job_id: self.context.offer.job_id,
            attempt: self.context.offer.attempt,
            index: index as u32,
            name: name.to_string(),
            state: state as i32,
            started_at,
            finished_at: if finished { now_millis() } else { 0 },
            exit_code,
        };
        let _ = self.context.messages.send(pb::agent_message::Message::Step(update));
    }

    /// An output channel whose lines go to the job's log under step `index`, and the task
    /// collecting them.
    fn output(&self, index: usize) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(256);
        let shipper = self.context.shipper.clone();
        let (job_id, attempt, masker) = (self.context.offer.job_id, self.context.offer.attempt, self.masker.clone());
        let collector = tokio::spawn(async move { shipper.collect(job_id, attempt, index as u32, masker, receiver).await });
        (sender, collector)
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// The job's environment: each configuration key as given, and also in upper case (`db_host`
/// is `$db_host` and `$DB_HOST`) unless a key of that name exists too.
pub fn job_environment(vars: &[pb::EnvVar]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vars.iter().map(|var| (var.name.clone(), var.value.clone())).collect();
    for var in vars {
        let upper = var.name.to_ascii_uppercase();
        let valid = upper.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !upper.starts_with(|c: char| c.is_ascii_digit());
        if valid && !env.iter().any(|(name, _)| *name == upper) {
            env.push((upper, var.value.clone()));
        }
    }
    env
}

fn executor_failure(error: crate::executor::ExecutorError, step: &str) -> Ended {
    match error.kind {
        ErrorKind::Infrastructure => Ended::new(JobOutcome::Infrastructure, format!("step {step}: {}", error.message)),
        ErrorKind::Job => Ended::new(JobOutcome::Failed, format!("step {step}: {}", error.message)),
    }
}

/// Run the job to its end. Never panics on the job's account; every way out is an [`Ended`].
pub async fn run_job(context: &JobContext) -> Ended {
    let spec: JobSpec = match serde_json::from_slice(&context.offer.spec_json) {
        Ok(spec) => spec,
        Err(error) => return Ended::new(JobOutcome::Failed, format!("this agent cannot read the job's spec (upgrade it?): {error}")),
    };
    let build = match &spec {
        JobSpec::Build(build) => build,
        JobSpec::Release(release) => return run_release(context, release).await,
    };
    let run = Run::new(context, build.timeout_seconds);
    let workspace = context.work_dir.join(format!("job-{}-{}", context.offer.job_id, context.offer.attempt));
    let _ = std::fs::remove_dir_all(&workspace);
    let mut ended = run_build(&run, build, &spec.step_names(), &workspace).await;
    ended.commit_time = crate::git::commit_time(&workspace).await;
    ended.resources = run.usage.usage().to_proto();
    if let Executor::Docker(docker) = context.executor.as_ref() {
        docker.remove_job_containers(context.offer.job_id).await;
    }
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&workspace)).await;
    ended
}

/// A release job: one step, named after its operation, carried out by the agent's release
/// manager within the job's timeout; what it found goes into `output` as JSON.
async fn run_release(context: &JobContext, spec: &ReleaseSpec) -> Ended {
    let run = Run::new(context, spec.timeout_seconds);
    let name = spec.op.name();
    let started = now_millis();
    run.step(0, name, StepState::Running, started, 0);
    let (output, collector) = run.output(0);
    let source = CoordinatorArtifacts { coordinator: context.coordinator.clone() };
    let progress_output = output.clone();
    let progress = move |line: String| {
        let _ = progress_output.try_send(format!("{line}\n").into_bytes());
    };
    let result = tokio::select! {
        result = tokio::time::timeout(run.timeout, context.releases.run(spec, &run.env, &source, &progress)) => Some(result),
        () = context.cancel.cancelled() => None,
    };
    let ended = match result {
        Some(Ok(Ok(release_output))) => {
            let mut ended = Ended::new(JobOutcome::Succeeded, "");
            ended.output = serde_json::to_vec(&release_output).unwrap_or_default();
            // The release container's CPU and memory so far, as this agent sampled them.
            ended.resources = context.releases.release_usage(&spec.service, &spec.release);
            run.step(0, name, StepState::Succeeded, started, 0);
            ended
        }
        Some(Ok(Err(error))) => {
            say(&output, format!("{name} failed: {error}")).await;
            run.step(0, name, StepState::Failed, started, 1);
            let outcome = match error {
                ReleaseError::Job(_) => JobOutcome::Failed,
                ReleaseError::Infrastructure(_) => JobOutcome::Infrastructure,
            };
            Ended::new(outcome, format!("release step {name} of {} on service {}: {error}", spec.release, spec.service))
        }
        Some(Err(_)) => {
            run.step(0, name, StepState::Failed, started, -1);
            Ended::new(JobOutcome::Failed, format!("release step {name} of {} timed out after {} s", spec.release, run.timeout.as_secs()))
        }
        None => {
            run.step(0, name, StepState::Cancelled, started, -1);
            Ended::new(JobOutcome::Cancelled, format!("cancelled during release step {name}"))
        }
    };
    drop(progress);
    drop(output);
    let _ = collector.await;
    ended
}

async fn run_build(run: &Run<'_>, build: &BuildSpec, names: &[String], workspace: &std::path::Path) -> Ended {
    let context = run.context;
    let mut index = 0;
    // Checkout.
    let started = now_millis();
    run.step(index, CHECKOUT_STEP, StepState::Running, started, 0);
    let (output, collector) = run.output(index);
    let checkout = tokio::select! {
        result = async {
            match &build.fetch_ref {
                Some(git_ref) => crate::git::checkout_ref(&build.repository_url, git_ref, &build.commit, workspace, &context.git_protocols, &output).await,
                None => crate::git::checkout(&build.repository_url, &build.commit, workspace, &context.git_protocols, &output).await,
            }
        } => Some(result),
        _ = context.cancel.cancelled() => None,
    };
    drop(output);
    let _ = collector.await;
    match checkout {
        Some(Ok(_)) => run.step(index, CHECKOUT_STEP, StepState::Succeeded, started, 0),
        Some(Err(error)) => {
            run.step(index, CHECKOUT_STEP, StepState::Failed, started, 1);
            skip_rest(run, names, index + 1);
            let outcome = match error {
                crate::git::CheckoutError::Job(_) => JobOutcome::Failed,
                crate::git::CheckoutError::Infrastructure(_) => JobOutcome::Infrastructure,
            };
            return Ended::new(outcome, format!("checkout of {} failed: {error}", build.commit));
        }
        None => {
            run.step(index, CHECKOUT_STEP, StepState::Cancelled, started, 0);
            return Ended::new(JobOutcome::Cancelled, "cancelled during checkout");
        }
    }
    // Command steps.
    for step in &build.steps {
        index += 1;
        let started = now_millis();
        run.step(index, &step.name, StepState::Running, started, 0);
        let (output, collector) = run.output(index);
        let request = StepRequest {
            job_id: context.offer.job_id,
            step_name: &step.name,
            command: &step.command,
            workspace,
            image: &build.image,
            env: &run.env,
            limits: Limits::default(),
            timeout: run.remaining(),
            usage: Some(&run.usage),
        };
        let result = context.executor.run_step(&request, output, context.cancel.clone()).await;
        let _ = collector.await;
        let failure = match result {
            Ok(StepOutcome::Exited { code: 0 }) => {
                run.step(index, &step.name, StepState::Succeeded, started, 0);
                continue;
            }
            Ok(StepOutcome::Exited { code }) => {
                run.step(index, &step.name, StepState::Failed, started, code);
                Ended::new(JobOutcome::Failed, format!("step {} exited with code {code}", step.name))
            }
            Ok(StepOutcome::TimedOut) => {
                run.step(index, &step.name, StepState::Failed, started, -1);
                Ended::new(JobOutcome::Failed, format!("the job timed out after {} s in step {}", run.timeout.as_secs(), step.name))
            }
            Ok(StepOutcome::Cancelled) => {
                run.step(index, &step.name, StepState::Cancelled, started, -1);
                Ended::new(JobOutcome::Cancelled, format!("cancelled during step {}", step.name))
            }
            Err(error) => {
                run.step(index, &step.name, StepState::Failed, started, -1);
                executor_failure(error, &step.name)
            }
        };
        skip_rest(run, names, index + 1);
        return failure;
    }
    // The image, then the artifacts.
    let mut packed = Vec::new();
    let scratch = context.work_dir.join(format!("artifacts-{}-{}", context.offer.job_id, context.offer.attempt));
    let _ = std::fs::create_dir_all(&scratch);
    if let Some(dockerfile) = &build.dockerfile {
        index += 1;
        let started = now_millis();
        run.step(index, IMAGE_STEP, StepState::Running, started, 0);
        let result = build_image(run, build, dockerfile, workspace, &scratch, index).await;
        match result {
            Ok(artifact) => {
                run.step(index, IMAGE_STEP, StepState::Succeeded, started, 0);
                packed.push(("image", artifact));
            }
            Err(ended) => {
                let state = if ended.outcome == JobOutcome::Cancelled { StepState::Cancelled } else { StepState::Failed };
                run.step(index, IMAGE_STEP, state, started, -1);
                skip_rest(run, names, index + 1);
                let _ = std::fs::remove_dir_all(&scratch);
                return ended;
            }
        }
    }
    if !build.artifacts.is_empty() || !packed.is_empty() {
        index += 1;
        let started = now_millis();
        run.step(index, ARTIFACTS_STEP, StepState::Running, started, 0);
        let result = artifacts(run, build, workspace, &scratch, packed, index).await;
        let _ = std::fs::remove_dir_all(&scratch);
        if let Err(ended) = result {
            run.step(index, ARTIFACTS_STEP, StepState::Failed, started, -1);
            return ended;
        }
        run.step(index, ARTIFACTS_STEP, StepState::Succeeded, started, 0);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ended::new(JobOutcome::Succeeded, "")
}

fn skip_rest(run: &Run<'_>, names: &[String], from: usize) {
    for (index, name) in names.iter().enumerate().skip(from) {
        run.step(index, name, StepState::Skipped, 0, 0);
    }
}

/// A line of the agent's own in a step's log.
async fn say(output: &mpsc::Sender<Vec<u8>>, text: String) {
    let _ = output.send(format!("{text}\n").into_bytes()).await;
}

async fn build_image(
    run: &Run<'_>,
    build: &BuildSpec,
    dockerfile: &str,
    workspace: &std::path::Path,
    scratch: &std::path::Path,
    index: usize,
) -> Result<crate::packing::PackedArtifact, Ended> {
    let Executor::Docker(docker) = run.context.executor.as_ref() else {
        return Err(Ended::new(JobOutcome::Failed, "building an image needs the docker executor; this agent has only shell"));
    };
    let (output, collector) = run.output(index);
    let tag = format!("davit/{}:{}", sanitize_tag(&build.pipeline_name), sanitize_tag(&build.artifact_version));
    let result = async {
        docker
            .build_image(workspace, dockerfile, &tag, output.clone(), run.context.cancel.clone())
            .await
            .map_err(|e| executor_failure(e, IMAGE_STEP))?;
        let tar = scratch.join("image.tar");
        docker.export_image(&tag, &tar).await.map_err(|e| executor_failure(e, IMAGE_STEP))?;
        let destination = scratch.join("image.tar.zst");
        let packed = tokio::task::spawn_blocking(move || crate::packing::pack_tar_file(&tar, &destination))
            .await
            .map_err(|e| Ended::new(JobOutcome::Infrastructure, format!("packing the image panicked: {e}")))?
            .map_err(|e| Ended::new(JobOutcome::Infrastructure, format!("packing the image failed: {e}")))?;
        say(&output, format!("image {tag} exported: sha256:{} ({} bytes)", packed.digest, packed.uncompressed_bytes)).await;
        Ok(packed)
    }
    .await;
    drop(output);
    let _ = collector.await;
    result
}

fn sanitize_tag(text: &str) -> String {
    let cleaned: String = text
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '-' })
        .collect();
    let tag: String = cleaned.trim_matches(|c| c == '-' || c == '.').chars().take(100).collect();
    if tag.is_empty() { "build".to_string() } else { tag }
}

async fn artifacts(
    run: &Run<'_>,
    build: &BuildSpec,
    workspace: &std::path::Path,
    scratch: &std::path::Path,
    mut packed: Vec<(&'static str, crate::packing::PackedArtifact)>,
    index: usize,
) -> Result<(), Ended> {
    let (output, collector) = run.output(index);
    let result = async {
        let mut speculation = None;
        let mut uploads: Vec<(&'static str, String, u64, Source)> = packed
            .drain(..)
            .map(|(name, artifact)| (name, artifact.digest, artifact.uncompressed_bytes, Source::File(artifact.path)))
            .collect();
        if !build.artifacts.is_empty() {
            // First pass: the digest alone, so that a stored artifact costs no compression.
            let (root, paths) = (workspace.to_path_buf(), build.artifacts.clone());
            speculation = Some(Speculation::start(root.clone(), paths.clone(), scratch.to_path_buf()));
            let started = Instant::now();
            let (digest, length) = tokio::task::spawn_blocking(move || crate::packing::digest(&root, &paths))
                .await
                .map_err(|e| Ended::new(JobOutcome::Infrastructure, format!("hashing panicked: {e}")))?
                .map_err(|e| Ended::new(JobOutcome::Failed, format!("packing the artifacts failed: {e}")))?;
            say(
                &output,
                format!(
                    "hashed {} into sha256:{digest} ({length} bytes of tar) in {} ms",
                    build.artifacts.join(", "),
                    started.elapsed().as_millis()
                ),
            )
            .await;
            uploads.push(("files", digest, length, Source::Workspace { root: workspace.to_path_buf(), paths: build.artifacts.clone() }));
        }
        for (name, digest, length, source) in &uploads {
            let meta = ArtifactMeta {
                job_id: run.context.offer.job_id,
                attempt: run.context.offer.attempt,
                name: name.to_string(),
                version: build.artifact_version.clone(),
                digest: digest.clone(),
                uncompressed_bytes: *length,
            };
            let started = Instant::now();
            let speculated = if matches!(source, Source::Workspace { .. }) { speculation.take() } else { None };
            let uploaded = upload(run.context, &meta, source, speculated).await?;
            let how = if uploaded.recorded.uploaded {
                format!("uploaded, {} bytes compressed, in {} ms", uploaded.sent_bytes, started.elapsed().as_millis())
            } else {
                "already stored; upload skipped".to_string()
            };
            say(&output, format!("artifact {name} sha256:{digest} recorded as artifact {} ({how})", uploaded.recorded.artifact_id)).await;
        }
        Ok(())
    }
    .await;
    drop(output);
    let _ = collector.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job_spec::{HealthCheck, ReleaseArtifact, ReleaseOp, ReleaseOutput, RunSettings};

    fn release_offer(op: ReleaseOp) -> JobOffer {
        let spec = JobSpec::Release(ReleaseSpec {
            op,
            service: "web-production".into(),
            release: "d7".into(),
            previous: Some("d6".into()),
            artifact: ReleaseArtifact { digest: "a".repeat(64), kind: "image".into() },
            run: RunSettings {
                container_port: 8080,
                public_port: 1,
                image: None,
                command: None,
                cpu_millis: 1000,
                memory_bytes: 1 << 31,
                keep_images: 2,
            },
            health: HealthCheck {
                http_path: None,
                interval_ms: 100,
                timeout_ms: 100,
                healthy_threshold: 1,
                unhealthy_threshold: 1,
                deadline_ms: 1000,
            },
            timeout_seconds: 30,
        });
        JobOffer { job_id: 41, attempt: 1, spec_json: serde_json::to_vec(&spec).unwrap(), ..Default::default() }
    }

    /// Runs a release job on an agent without Docker; returns how it ended and its step updates.
    async fn run_release_job(op: ReleaseOp) -> (Ended, Vec<StepUpdate>) {
        let state_dir = tempfile::tempdir().unwrap();
        let (_coordinator, watcher) = watch::channel(None);
        let (messages, mut received) = mpsc::unbounded_channel();
        let context = JobContext {
            offer: release_offer(op),
            executor: Arc::new(Executor::Shell(crate::executor::ShellExecutor::new())),
            shipper: LogShipper::start(state_dir.path().join("spool"), watcher.clone()).unwrap(),
            work_dir: state_dir.path().join("work"),
            git_protocols: vec![],
            messages,
            coordinator: watcher,
            cancel: CancellationToken::new(),
            releases: Arc::new(ReleaseManager::restore(state_dir.path(), None, std::net::Ipv4Addr::LOCALHOST.into()).await),
        };
        let ended = run_job(&context).await;
        drop(context);
        let mut steps = Vec::new();
        while let Some(message) = received.recv().await {
            if let pb::agent_message::Message::Step(step) = message {
                steps.push(step);
            }
        }
        (ended, steps)
    }

    #[tokio::test]
    async fn a_release_job_reports_one_step_named_after_its_operation_and_its_output_as_json() {
        let (ended, steps) = run_release_job(ReleaseOp::Stats { since_ms: 0 }).await;
        assert_eq!(ended.outcome, JobOutcome::Succeeded, "{}", ended.reason);
        let output: ReleaseOutput = serde_json::from_slice(&ended.output).unwrap();
        assert_eq!(output.stats, Some(Default::default()));
        let seen: Vec<(u32, &str, i32)> = steps.iter().map(|step| (step.index, step.name.as_str(), step.state)).collect();
        assert_eq!(seen, vec![(0, "stats", StepState::Running as i32), (0, "stats", StepState::Succeeded as i32)]);
    }

    #[tokio::test]
    async fn a_release_job_on_an_agent_without_docker_fails_saying_so() {
        let (ended, steps) = run_release_job(ReleaseOp::Start).await;
        assert_eq!(ended.outcome, JobOutcome::Failed);
        assert!(ended.reason.contains("without Docker"), "{}", ended.reason);
        assert_eq!(steps.last().map(|step| (step.name.as_str(), step.state)), Some(("start", StepState::Failed as i32)));
    }

    #[test]
    fn configuration_keys_are_also_offered_in_upper_case() {
        let var = |name: &str, value: &str| pb::EnvVar { name: name.into(), value: value.into(), secret: false };
        let env = job_environment(&[var("db_host", "a"), var("API_KEY", "b"), var("path", "c"), var("PATH", "d"), var("my-key", "e")]);
        let find = |name: &str| env.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
        assert_eq!((find("db_host"), find("DB_HOST")), (Some("a"), Some("a")));
        assert_eq!(find("API_KEY"), Some("b"));
        assert_eq!((find("path"), find("PATH")), (Some("c"), Some("d")));
        assert_eq!(find("MY-KEY"), None);
    }
}
