//! The Docker executor: runs a step's `sh -c` in a fresh container of the job's image, with the
//! workspace bind-mounted at `/workspace`, and builds, saves and loads images for the job.
//! It never pulls: no registry is reachable, so images must already be on the agent host. It
//! always removes the containers it creates, also when a step times out, is cancelled or its
//! future is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, BuildImageOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{ExecutorError, OutputSender, StepOutcome, StepRequest};

/// Where the engine listens when `DOCKER_HOST` is not set.
const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// bollard bounds every request by the time until its response headers arrive (2 minutes by
/// default). Attach, wait, build and save answer at once and then stream, but `docker load`
/// of a large image answers only after reading the whole upload, hence a generous bound. The
/// step's own timeout and cancellation are enforced separately, by killing the container.
const REQUEST_TIMEOUT_SECONDS: u64 = 30 * 60;

/// How long the engine may take to answer the ping that `connect` sends.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// After a timed-out or cancelled container is killed, how long the output it wrote before
/// may take to arrive; the container is removed in any case.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(2);

/// Labels on every step container, so that `remove_job_containers` finds a job's leftovers
/// after an agent restart.
pub const JOB_LABEL: &str = "davit.job";
pub const STEP_LABEL: &str = "davit.step";

/// Where the workspace is mounted inside a step container (also its working directory).
pub const CONTAINER_WORKSPACE: &str = "/workspace";

/// Size of the pieces in which `load_image` streams an image archive to the engine.
const LOAD_CHUNK_BYTES: usize = 256 * 1024;

/// Runs steps in containers of the local Docker engine. Cheap to clone (one shared client).
#[derive(Clone)]
pub struct DockerExecutor {
    docker: Docker,
}

impl DockerExecutor {
    /// Connects to the local engine (or the one `DOCKER_HOST` names: `unix://` or plain
    /// `tcp://`) and pings it, so that an agent without a working engine fails at start.
    pub async fn connect() -> Result<DockerExecutor, ExecutorError> {
        let host =
            std::env::var("DOCKER_HOST").ok().filter(|host| !host.trim().is_empty()).unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string());
        let unreachable = |detail: String| {
            ExecutorError::infrastructure(format!(
                "the Docker engine at {host} is unreachable ({detail}); start Docker on this host, \
                 check that the agent's user may use its socket, or point DOCKER_HOST at a running engine"
            ))
        };
        let docker = if host.starts_with("unix://") {
            Docker::connect_with_unix(&host, REQUEST_TIMEOUT_SECONDS, API_DEFAULT_VERSION)
        } else if host.starts_with("tcp://") || host.starts_with("http://") {
            Docker::connect_with_http(&host, REQUEST_TIMEOUT_SECONDS, API_DEFAULT_VERSION)
        } else {
            return Err(ExecutorError::infrastructure(format!(
                "DOCKER_HOST={host} is not supported by the agent; use unix:///path/to/docker.sock or tcp://host:port (without TLS)"
            )));
        }
        .map_err(|error| unreachable(error.to_string()))?;

        match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
            Err(_) => return Err(unreachable(format!("no answer to a ping within {} s", PING_TIMEOUT.as_secs()))),
            Ok(Err(error)) => return Err(unreachable(error.to_string())),
            Ok(Ok(_)) => {}
        }
        // bollard 0.21 assumes API 1.53; tell it what the engine speaks, so that it does not
        // send fields an older engine would misread. Failing here is not fatal: the ping
        // worked, and the engine answers in its own version anyway.
        let docker = match tokio::time::timeout(PING_TIMEOUT, docker.clone().negotiate_version()).await {
            Ok(Ok(negotiated)) => negotiated,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not negotiate the Docker API version; using bollard's default");
                docker
            }
            Err(_) => {
                tracing::warn!("the Docker engine did not say its API version in time; using bollard's default");
                docker
            }
        };
        Ok(DockerExecutor { docker })
    }

    /// The engine connection, for the release manager's containers (one connection per agent).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Runs one step in a new container and removes the container afterwards.
    ///
    /// Output (stdout and stderr, interleaved as the engine delivers them) goes to `output`
    /// as it comes; a slow receiver slows the container down rather than losing bytes, and a
    /// dropped receiver only discards them. `Exited` is returned only after all output was
    /// delivered. On timeout or cancellation the container is killed with SIGKILL at once
    /// (no grace period: the step's results are discarded anyway), so it stops within a
    /// second or two.
    pub async fn run_step(
        &self,
        request: &StepRequest<'_>,
        output: OutputSender,
        cancel: CancellationToken,
    ) -> Result<StepOutcome, ExecutorError> {
        // The deadline covers the whole step, container creation included.
        let deadline = tokio::time::sleep(request.timeout);
        self.ensure_image_exists(request.image).await?;
        let workspace = std::fs::canonicalize(request.workspace).map_err(|error| {
            ExecutorError::infrastructure(format!(
                "the workspace {} of job {} is not usable: {error}",
                request.workspace.display(),
                request.job_id
            ))
        })?;
        if cancel.is_cancelled() {
            return Ok(StepOutcome::Cancelled);
        }

        let name = container_name(request.job_id, request.step_name);
        let created = self
            .docker
            .create_container(Some(CreateContainerOptionsBuilder::new().name(&name).build()), container_body(request, &workspace))
            .await;
        let container_id = match created {
            Ok(created) => created.id,
            Err(error) => {
                return Err(classify(
                    &error,
                    &format!("cannot create the container of step {} of job {}", request.step_name, request.job_id),
                ));
            }
        };
        // From here on the container exists: the guard removes it even if this future is
        // dropped half-way.
        let mut removal = ContainerRemoval { docker: self.docker.clone(), container_id: Some(container_id.clone()) };

        let outcome = self.run_container(&container_id, request, output, cancel, deadline).await;
        removal.remove_now().await;
        outcome
    }

    /// Attaches to, starts and waits for a created container, killing it on timeout or
    /// cancellation. The caller removes it.
    async fn run_container(
        &self,
        container_id: &str,
        request: &StepRequest<'_>,
        output: OutputSender,
        cancel: CancellationToken,
        deadline: tokio::time::Sleep,
    ) -> Result<StepOutcome, ExecutorError> {
        let context = || format!("step {} of job {}", request.step_name, request.job_id);
        // Attach before starting, as `docker run` does: nothing the step prints is missed,
        // whatever log driver the engine uses. (The engine connects the streams before it
        // answers the attach request; replaying logs would only risk duplicates.)
        let attach_options = AttachContainerOptionsBuilder::new().stdout(true).stderr(true).stream(true).logs(false).build();
        let attached = self
            .docker
            .attach_container(container_id, Some(attach_options))
            .await
            .map_err(|error| classify(&error, &format!("cannot attach to the container of {}", context())))?;
        if cancel.is_cancelled() {
            return Ok(StepOutcome::Cancelled);
        }
        if let Err(error) = self.docker.start_container(container_id, None).await {
            return Err(classify(&error, &format!("cannot start the container of {}", context())));
        }

        // Both must finish for an exit: the attach stream ends once the engine has copied all
        // the container's output, the wait once its main process has exited.
        let run = async {
            let ((), exit) = tokio::join!(forward_output(attached.output, output), self.wait_for_exit(container_id));
            exit
        };
        // The container's CPU and memory are sampled while it runs, for the job's result.
        let sampling = async {
            match request.usage {
                Some(recorder) => crate::resource_usage::sample_until_dropped(&self.docker, container_id, recorder).await,
                None => std::future::pending().await,
            }
        };
        let run = async {
            tokio::select! {
                exit = run => exit,
                () = sampling => unreachable!("sampling runs until dropped"),
            }
        };
        let mut run = std::pin::pin!(run);
        let mut deadline = std::pin::pin!(deadline);
        let stopped = tokio::select! {
            exit = &mut run => {
                return exit.map(|code| StepOutcome::Exited { code }).map_err(|error| classify(&error, &format!("lost track of the container of {}", context())));
            }
            () = &mut deadline => StepOutcome::TimedOut,
            () = cancel.cancelled() => StepOutcome::Cancelled,
        };
        self.kill(container_id).await;
        // Deliver what the step printed before it was killed, but never wait long for it.
        let _ = tokio::time::timeout(DRAIN_AFTER_KILL, &mut run).await;
        Ok(stopped)
    }

    async fn wait_for_exit(&self, container_id: &str) -> Result<i64, BollardError> {
        let options = WaitContainerOptionsBuilder::new().condition("not-running").build();
        let mut waiting = self.docker.wait_container(container_id, Some(options));
        match waiting.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // bollard 0.21 turns every non-zero exit code into an error.
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(error)) => Err(error),
            None => Err(BollardError::DockerStreamError { error: "the engine closed the wait stream without an exit code".to_string() }),
        }
    }

    async fn kill(&self, container_id: &str) {
        let options = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
        match self.docker.kill_container(container_id, Some(options)).await {
            Ok(()) => {}
            // 409: it already stopped by itself; 404: it is already gone.
            Err(BollardError::DockerResponseServerError { status_code: 404 | 409, .. }) => {}
            Err(error) => tracing::warn!(container_id, %error, "could not kill a step container; removing it by force"),
        }
    }

    async fn ensure_image_exists(&self, image: &str) -> Result<(), ExecutorError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Err(missing_image(image)),
            Err(error) => Err(classify(&error, &format!("cannot inspect the image {image}"))),
        }
    }

    /// Force-removes every container labelled with this job, running or not: leftovers of an
    /// agent that stopped in the middle of a step, or of a cancelled job. Failures are logged
    /// and otherwise ignored, since the next call will try again.
    pub async fn remove_job_containers(&self, job_id: u64) {
        let filters = HashMap::from([("label", vec![format!("{JOB_LABEL}={job_id}")])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers = match self.docker.list_containers(Some(options)).await {
            Ok(containers) => containers,
            Err(error) => {
                tracing::warn!(job_id, %error, "could not list the containers of a job to remove them");
                return;
            }
        };
        for container_id in containers.into_iter().filter_map(|container| container.id) {
            remove_container(&self.docker, &container_id).await;
        }
    }

    /// Builds `context_dir` with the Dockerfile at `dockerfile` (a path inside the context)
    /// and tags the result `tag`, streaming the build's output into `output`. Returns the
    /// image id (`sha256:...`).
    ///
    /// The context is sent as an in-memory tar with symbolic links kept as links, as the
    /// Docker CLI does; `.dockerignore` is not applied. Base images must be local too: the
    /// engine tries to pull a missing one, which fails without a registry. A build that
    /// fails, and a cancelled build, are `ErrorKind::Job` errors; closing the request makes
    /// the engine abandon the build.
    pub async fn build_image(
        &self,
        context_dir: &Path,
        dockerfile: &str,
        tag: &str,
        output: OutputSender,
        cancel: CancellationToken,
    ) -> Result<String, ExecutorError> {
        if !context_dir.join(dockerfile).is_file() {
            return Err(ExecutorError::job(format!("there is no Dockerfile {dockerfile} in the build context {}", context_dir.display())));
        }
        let context_dir_owned = context_dir.to_path_buf();
        let context = tokio::task::spawn_blocking(move || tar_directory(&context_dir_owned))
            .await
            .map_err(|error| ExecutorError::infrastructure(format!("packing the build context failed: {error}")))?
            .map_err(|error| ExecutorError::infrastructure(format!("cannot pack the build context {}: {error}", context_dir.display())))?;

        let options = BuildImageOptionsBuilder::new().dockerfile(dockerfile).t(tag).rm(true).forcerm(true).build();
        let mut build = std::pin::pin!(self.docker.build_image(options, None, Some(bollard::body_full(context.into()))));
        let mut image_id = None;
        loop {
            let message = tokio::select! {
                message = build.next() => message,
                () = cancel.cancelled() => return Err(ExecutorError::job(format!("the build of {tag} was cancelled"))),
            };
            let Some(message) = message else { break };
            let info = match message {
                Ok(info) => info,
                Err(BollardError::DockerStreamError { error }) => {
                    let _ = output.send(format!("{error}\n").into_bytes()).await;
                    return Err(ExecutorError::job(format!("the image {tag} did not build: {}", error.trim_end())));
                }
                Err(error) => return Err(classify_build(&error, &format!("the image {tag} did not build"))),
            };
            let text = info.stream.or(info.status);
            if let Some(text) = text.filter(|text| !text.is_empty()) {
                let _ = output.send(text.into_bytes()).await;
            }
            if let Some(id) = info.aux.and_then(|aux| aux.id) {
                image_id = Some(id);
            }
        }
        // The classic builder reports the id in an `aux` message; ask for it if it did not.
        match image_id {
            Some(id) => Ok(id),
            None => match self.docker.inspect_image(tag).await {
                Ok(image) => {
                    image.id.ok_or_else(|| ExecutorError::infrastructure(format!("the engine built {tag} but reports no image id")))
                }
                Err(error) => Err(classify(&error, &format!("the build of {tag} ended but its image cannot be inspected"))),
            },
        }
    }

    /// Writes `image` as a `docker save` archive to `dest_tar`. The archive is written next
    /// to `dest_tar` and renamed into place, so a partial archive never has the final name.
    pub async fn export_image(&self, image: &str, dest_tar: &Path) -> Result<(), ExecutorError> {
        self.ensure_image_exists(image).await?;
        let partial = partial_path(dest_tar);
        let written = self.write_image_archive(image, &partial).await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
            return written;
        }
        tokio::fs::rename(&partial, dest_tar).await.map_err(|error| {
            ExecutorError::infrastructure(format!("cannot move the archive of {image} to {}: {error}", dest_tar.display()))
        })
    }

    async fn write_image_archive(&self, image: &str, path: &Path) -> Result<(), ExecutorError> {
        let file_error = |error: std::io::Error| {
            ExecutorError::infrastructure(format!("cannot write the archive of {image} to {}: {error}", path.display()))
        };
        let mut file = tokio::fs::File::create(path).await.map_err(file_error)?;
        let mut archive = std::pin::pin!(self.docker.export_images(&[image]));
        while let Some(chunk) = archive.next().await {
            let chunk = chunk.map_err(|error| classify(&error, &format!("cannot export the image {image}")))?;
            file.write_all(&chunk).await.map_err(file_error)?;
        }
        file.sync_all().await.map_err(file_error)?;
        Ok(())
    }

    /// Loads a `docker save` archive into the engine (`docker load`), streaming the file.
    pub async fn load_image(&self, tar_path: &Path) -> Result<(), ExecutorError> {
        let file = tokio::fs::File::open(tar_path)
            .await
            .map_err(|error| ExecutorError::infrastructure(format!("cannot open the image archive {}: {error}", tar_path.display())))?;
        let options = ImportImageOptionsBuilder::new().quiet(true).build();
        // The file as a stream of chunks, so the request never holds the whole archive.
        let chunks = futures::stream::try_unfold(file, |mut file| async move {
            let mut chunk = vec![0; LOAD_CHUNK_BYTES];
            let read = file.read(&mut chunk).await?;
            if read == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            chunk.truncate(read);
            Ok(Some((chunk.into(), file)))
        });
        let mut loading = std::pin::pin!(self.docker.import_image_stream(options, chunks, None));
        while let Some(message) = loading.next().await {
            match message {
                Ok(_) => {}
                Err(BollardError::DockerStreamError { error }) => {
                    return Err(ExecutorError::job(format!("the image archive {} did not load: {}", tar_path.display(), error.trim_end())));
                }
                Err(error) => return Err(classify_build(&error, &format!("the image archive {} did not load", tar_path.display()))),
            }
        }
        Ok(())
    }
}

/// Removes a step's container when dropped before `remove_now` ran, so that a dropped
/// `run_step` future does not leave a container running.
struct ContainerRemoval {
    docker: Docker,
    container_id: Option<String>,
}

impl ContainerRemoval {
    async fn remove_now(&mut self) {
        if let Some(container_id) = self.container_id.take() {
            remove_container(&self.docker, &container_id).await;
        }
    }
}

impl Drop for ContainerRemoval {
    fn drop(&mut self) {
        let Some(container_id) = self.container_id.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(container_id, "a step container is left behind: no runtime to remove it; remove_job_containers will");
            return;
        };
        let docker = self.docker.clone();
        runtime.spawn(async move { remove_container(&docker, &container_id).await });
    }
}

async fn remove_container(docker: &Docker, container_id: &str) {
    let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
    match docker.remove_container(container_id, Some(options)).await {
        // 404: already gone. 409: another removal of the same container is in progress.
        Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 404 | 409, .. }) => {}
        Err(error) => tracing::warn!(container_id, %error, "could not remove a step container"),
    }
}

/// Copies the attach stream into `output` until the engine closes it. Keeps reading after
/// the receiver is gone, so that the container never blocks on a full pipe.
async fn forward_output(mut attached: impl Stream<Item = Result<LogOutput, BollardError>> + Unpin, output: OutputSender) {
    let mut receiver_open = true;
    while let Some(piece) = attached.next().await {
        let bytes = match piece {
            Ok(LogOutput::StdOut { message } | LogOutput::StdErr { message } | LogOutput::Console { message }) => message,
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(error) => {
                tracing::warn!(%error, "the output stream of a step container broke off");
                return;
            }
        };
        if receiver_open && !bytes.is_empty() && output.send(bytes.to_vec()).await.is_err() {
            receiver_open = false;
        }
    }
}

fn container_body(request: &StepRequest<'_>, workspace: &Path) -> ContainerCreateBody {
    let labels =
        HashMap::from([(JOB_LABEL.to_string(), request.job_id.to_string()), (STEP_LABEL.to_string(), request.step_name.to_string())]);
    // A zero limit means "no limit", as for Docker itself.
    let nano_cpus = (request.limits.cpus > 0.0).then(|| (request.limits.cpus * 1e9).round() as i64);
    let memory = (request.limits.memory_bytes > 0).then(|| i64::try_from(request.limits.memory_bytes).unwrap_or(i64::MAX));
    ContainerCreateBody {
        image: Some(request.image.to_string()),
        cmd: Some(vec!["sh".to_string(), "-c".to_string(), request.command.to_string()]),
        // The image's own entrypoint would change what `sh -c` means.
        entrypoint: Some(vec![]),
        env: Some(request.env.iter().map(|(name, value)| format!("{name}={value}")).collect()),
        working_dir: Some(CONTAINER_WORKSPACE.to_string()),
        labels: Some(labels),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        open_stdin: Some(false),
        host_config: Some(HostConfig {
            binds: Some(vec![format!("{}:{CONTAINER_WORKSPACE}:rw", workspace.display())]),
            nano_cpus,
            memory,
            // Equal to the memory limit: no swap on top of it.
            memory_swap: memory,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `davit-job-<job>-<step>-<8 hex digits>`, with the step name reduced to the characters
/// Docker allows in names.
fn container_name(job_id: u64, step_name: &str) -> String {
    let step: String =
        step_name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' }).take(64).collect();
    format!("davit-job-{job_id}-{step}-{:08x}", rand::random::<u32>())
}

fn missing_image(image: &str) -> ExecutorError {
    ExecutorError::job(format!(
        "the image {image} is not on this agent host and no registry is reachable; build it (docker build) or load it \
         (docker load) on the agent host"
    ))
}

/// Splits engine errors into what a job can fix (4xx: a bad image, command or option) and
/// what another host may not have (the engine unreachable, a 5xx).
fn classify(error: &BollardError, context: &str) -> ExecutorError {
    match error {
        BollardError::DockerResponseServerError { status_code: 400..=499, message } => ExecutorError::job(format!("{context}: {message}")),
        BollardError::DockerResponseServerError { message, .. } => {
            ExecutorError::infrastructure(format!("{context}: the Docker engine failed: {message}"))
        }
        other => ExecutorError::infrastructure(format!("{context}: {other}")),
    }
}

/// A build or load that the engine refuses is the job's fault whatever the status code (the
/// engine answers 500 for a Dockerfile it cannot parse); only a lost connection is not.
fn classify_build(error: &BollardError, context: &str) -> ExecutorError {
    match error {
        BollardError::DockerResponseServerError { message, .. } => ExecutorError::job(format!("{context}: {message}")),
        other => ExecutorError::infrastructure(format!("{context}: the Docker engine could not be reached: {other}")),
    }
}

/// Packs a directory into an uncompressed tar in memory, paths relative to the directory.
fn tar_directory(directory: &Path) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", directory)?;
    builder.into_inner()
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push(".partial");
    dest.with_file_name(name)
}
