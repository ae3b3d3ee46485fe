//! The shell executor: runs a step's `sh -c` as a child process of the agent, in the job's
//! workspace, in a process group of its own so that a timeout or a cancellation kills
//! everything the step started. It isolates nothing and enforces no resource limits
//! (`Limits` is ignored): use it only on hosts dedicated to trusted jobs.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::{ExecutorError, OutputSender, StepOutcome, StepRequest};

/// PATH of a step when the agent itself has none.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Once the step is over, how long its output pipes may take to reach their end. Only a
/// process that left the step's process group (with `setsid`) can hold them open longer.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Runs steps as plain processes on the agent host.
///
/// The step's environment is cleared except PATH (the agent's own), HOME (set to the
/// workspace) and the job's variables, which may override both. Resource limits are not
/// enforced. When the step's shell exits, whatever it left running in its process group is
/// killed too, as Docker does when a container's main process exits.
#[derive(Debug, Clone, Default)]
pub struct ShellExecutor {}

impl ShellExecutor {
    pub fn new() -> ShellExecutor {
        ShellExecutor {}
    }

    /// Runs one step to its end, its timeout or its cancellation, with the same contract as
    /// the Docker executor: `Exited` only after all output was delivered, and on timeout or
    /// cancellation the whole process group killed with SIGKILL at once.
    pub async fn run_step(
        &self,
        request: &StepRequest<'_>,
        output: OutputSender,
        cancel: CancellationToken,
    ) -> Result<StepOutcome, ExecutorError> {
        let deadline = tokio::time::sleep(request.timeout);
        if cancel.is_cancelled() {
            return Ok(StepOutcome::Cancelled);
        }
        let path = std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into());
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(request.command)
            .current_dir(request.workspace)
            .env_clear()
            .env("PATH", path)
            .env("HOME", request.workspace)
            .envs(request.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A new process group whose id is the shell's pid: killing the group reaches
            // every process the step starts, unless one calls setsid itself.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|error| {
            ExecutorError::infrastructure(format!(
                "cannot start `sh` for step {} of job {} in {}: {error}",
                request.step_name,
                request.job_id,
                request.workspace.display()
            ))
        })?;
        let mut group = ProcessGroup { id: child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) };

        // Both pipes are read by their own task, so neither can fill up and block the step,
        // and their pieces reach `output` in the order they are read.
        let stdout = child.stdout.take().map(|pipe| tokio::spawn(forward_pipe(pipe, output.clone())));
        let stderr = child.stderr.take().map(|pipe| tokio::spawn(forward_pipe(pipe, output)));

        let mut deadline = std::pin::pin!(deadline);
        let outcome = tokio::select! {
            status = child.wait() => match status {
                Ok(status) => Ok(StepOutcome::Exited { code: exit_code(status) }),
                Err(error) => Err(ExecutorError::infrastructure(format!("lost track of step {} of job {}: {error}", request.step_name, request.job_id))),
            },
            () = &mut deadline => Ok(StepOutcome::TimedOut),
            () = cancel.cancelled() => Ok(StepOutcome::Cancelled),
        };
        // Also after a normal exit: background processes the step left behind would hold its
        // pipes open, and outlive it.
        group.kill();
        if !matches!(outcome, Ok(StepOutcome::Exited { .. })) {
            let _ = child.wait().await;
        }
        for forwarder in [stdout, stderr].into_iter().flatten() {
            let abort = forwarder.abort_handle();
            if tokio::time::timeout(DRAIN_AFTER_EXIT, forwarder).await.is_err() {
                tracing::warn!(
                    job_id = request.job_id,
                    step = request.step_name,
                    "a process outside the step's group holds its output open; not waiting for it"
                );
                abort.abort();
            }
        }
        outcome
    }
}

/// The step's process group; `kill` sends SIGKILL to all of it.
struct ProcessGroup {
    id: Option<libc::pid_t>,
}

impl ProcessGroup {
    /// Kills the group once; later calls do nothing.
    ///
    /// The group's id is the shell's pid (process_group(0)), and the kernel keeps it reserved
    /// while any member is alive. After a normal exit the shell is already reaped, so if no
    /// member is left the id could in theory have been reused in the microseconds since;
    /// that would need the pids to wrap around in between, which is why this is acceptable.
    fn kill(&mut self) {
        let Some(id) = self.id.take().filter(|id| *id > 0) else { return };
        // SAFETY: kill(2) with a negative pid signals that process group and touches no
        // memory of ours. ESRCH (nobody left in the group) is the common, harmless failure.
        unsafe {
            libc::kill(-id, libc::SIGKILL);
        }
    }
}

impl Drop for ProcessGroup {
    /// A dropped `run_step` future must not leave the step running; `kill_on_drop` alone
    /// would only reach the shell, not what it started.
    fn drop(&mut self) {
        self.kill();
    }
}

/// A signal's death reported as the shell does: 128 + the signal's number.
fn exit_code(status: std::process::ExitStatus) -> i64 {
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(signal)) => 128 + i64::from(signal),
        (None, None) => -1,
    }
}

/// Copies a pipe into `output` until its end. Keeps reading after the receiver is gone, so
/// that the step never blocks on a full pipe.
async fn forward_pipe(mut pipe: impl AsyncRead + Unpin, output: OutputSender) {
    let mut receiver_open = true;
    let mut buffer = vec![0; READ_CHUNK_BYTES];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) => return,
            Ok(read) => {
                if receiver_open && output.send(buffer[..read].to_vec()).await.is_err() {
                    receiver_open = false;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::warn!(%error, "reading a step's output failed");
                return;
            }
        }
    }
}
