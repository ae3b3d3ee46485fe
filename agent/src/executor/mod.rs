//! Executors run one step of a job: a command in the job's workspace, either in a Docker
//! container (`docker`, through bollard) or as a plain process (`shell`). The agent chooses one
//! explicitly at start; it never falls back from Docker to shell silently.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod docker;
pub mod shell;

pub use docker::DockerExecutor;
pub use shell::ShellExecutor;

/// Resource limits of a build container. The seed's defaults: 1 CPU, 2 GB of memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub cpus: f64,
    pub memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { cpus: 1.0, memory_bytes: 2 * 1024 * 1024 * 1024 }
    }
}

/// One step to run.
#[derive(Debug, Clone)]
pub struct StepRequest<'a> {
    pub job_id: u64,
    /// The step's name (build, test, package...), used in container names and messages.
    pub step_name: &'a str,
    /// Run with `sh -c`.
    pub command: &'a str,
    /// The checked-out repository; mounted at `/workspace` in a container, the working
    /// directory of a shell step.
    pub workspace: &'a Path,
    /// The container image (Docker only; the shell executor ignores it).
    pub image: &'a str,
    /// The job's configuration and secrets, as environment variables.
    pub env: &'a [(String, String)],
    pub limits: Limits,
    pub timeout: Duration,
    /// Where the Docker executor records the CPU and memory of the step's container while it
    /// runs (the shell executor records nothing).
    pub usage: Option<&'a crate::resource_usage::UsageRecorder>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Exited { code: i64 },
    TimedOut,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host could not run the step (Docker unreachable, disk full): another agent may.
    Infrastructure,
    /// The job asks for something that cannot work anywhere (an image that does not exist, a
    /// Dockerfile that does not build): retrying will not help.
    Job,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ExecutorError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ExecutorError {
    pub fn infrastructure(message: impl Into<String>) -> Self {
        ExecutorError { kind: ErrorKind::Infrastructure, message: message.into() }
    }

    pub fn job(message: impl Into<String>) -> Self {
        ExecutorError { kind: ErrorKind::Job, message: message.into() }
    }
}

/// Output of a step as it arrives: stdout and stderr interleaved, in arbitrary pieces (not
/// split at lines). The receiver splits lines, detects levels and masks secrets.
pub type OutputSender = mpsc::Sender<Vec<u8>>;

pub enum Executor {
    Docker(DockerExecutor),
    Shell(ShellExecutor),
}

impl Executor {
    pub fn name(&self) -> &'static str {
        match self {
            Executor::Docker(_) => "docker",
            Executor::Shell(_) => "shell",
        }
    }

    /// Run one step to its end, its timeout, or its cancellation (which stops the container
    /// or kills the process group within a few seconds).
    pub async fn run_step(
        &self,
        request: &StepRequest<'_>,
        output: OutputSender,
        cancel: CancellationToken,
    ) -> Result<StepOutcome, ExecutorError> {
        match self {
            Executor::Docker(docker) => docker.run_step(request, output, cancel).await,
            Executor::Shell(shell) => shell.run_step(request, output, cancel).await,
        }
    }
}
