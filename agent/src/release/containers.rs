//! Release containers on the local Docker engine, through the executor's connection: created
//! under a fixed name per service and release (so that a repeated Start finds its container),
//! labelled, limited, published on 127.0.0.1 only (the switch is the public way in), and
//! restarted by Docker unless the agent stopped them.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerUpdateBody, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    StopContainerOptionsBuilder, TagImageOptionsBuilder,
};
use futures::StreamExt;

use super::ReleaseError;
use crate::job_spec::RunSettings;

pub const SERVICE_LABEL: &str = "davit.service";
pub const RELEASE_LABEL: &str = "davit.release";
/// The agent instance that runs the release (several agents may share one engine).
pub const AGENT_LABEL: &str = "davit.agent";
/// Where a `files` artifact is mounted (and the working directory of its command).
pub const FILES_MOUNT: &str = "/release";
/// How long a stopped release gets to exit after SIGTERM before it is killed.
const STOP_GRACE_SECONDS: i32 = 10;
/// A release must still run this long after its start to count as started.
const SETTLE: Duration = Duration::from_millis(1000);

/// One name per agent, service and release, so that a retried Start finds the container it
/// created, and agents sharing one Docker engine (several on one machine) never take each
/// other's. `instance` names the agent's state directory ([`super::instance_of`]).
pub fn container_name(instance: &str, service: &str, release: &str) -> String {
    format!("davit-release-{instance}-{service}-{release}")
}

/// The tag the agent gives a release's image, so that clean-up finds the images of a service.
pub fn image_repository(instance: &str, service: &str) -> String {
    format!("davit-release/{instance}-{}", service.to_ascii_lowercase())
}

fn engine(context: &str, error: BollardError) -> ReleaseError {
    match error {
        BollardError::DockerResponseServerError { status_code: 400..=499, message } => ReleaseError::Job(format!("{context}: {message}")),
        other => ReleaseError::Infrastructure(format!("{context}: the Docker engine failed: {other}")),
    }
}

/// What runs: the image, and the command when one replaces the image's own.
pub struct ContainerPlan<'a> {
    /// The agent's instance name (see [`container_name`]).
    pub instance: &'a str,
    pub service: &'a str,
    pub release: &'a str,
    pub image: String,
    pub command: Option<String>,
    /// For a `files` artifact: the directory mounted read-only at [`FILES_MOUNT`].
    pub files: Option<&'a Path>,
    pub env: &'a [(String, String)],
    pub run: &'a RunSettings,
}

/// A running container: its id and the host port its `container_port` is published on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub container_id: String,
    pub host_port: u16,
}

/// Where a container is: running (with its published port), exited, or gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Running(Running),
    Exited { container_id: String, exit_code: i64 },
    Missing,
}

/// Where the container `name_or_id` is; for a running one, the host port its `container_port`
/// is published on (it changes when Docker restarts the container).
pub async fn find(docker: &Docker, name_or_id: &str, container_port: u16) -> Result<Found, ReleaseError> {
    let inspected = match docker.inspect_container(name_or_id, None).await {
        Ok(inspected) => inspected,
        Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => return Ok(Found::Missing),
        Err(error) => return Err(engine(&format!("cannot inspect container {name_or_id}"), error)),
    };
    let container_id = inspected.id.clone().unwrap_or_else(|| name_or_id.to_string());
    let state = inspected.state.clone().unwrap_or_default();
    if !state.running.unwrap_or(false) || state.restarting.unwrap_or(false) {
        return Ok(Found::Exited { container_id, exit_code: state.exit_code.unwrap_or(-1) });
    }
    let port = inspected
        .network_settings
        .and_then(|settings| settings.ports)
        .and_then(|ports| ports.get(&format!("{container_port}/tcp")).cloned().flatten())
        .and_then(|bindings| bindings.into_iter().find_map(|binding| binding.host_port.and_then(|port| port.parse::<u16>().ok())));
    match port {
        Some(host_port) => Ok(Found::Running(Running { container_id, host_port })),
        None => Err(ReleaseError::Job(format!(
            "container {name_or_id} runs but publishes no port for {container_port}/tcp; is container_port right?"
        ))),
    }
}

/// Start the release's container, or find it running from an earlier attempt.
pub async fn start(docker: &Docker, plan: &ContainerPlan<'_>) -> Result<Running, ReleaseError> {
    let name = container_name(plan.instance, plan.service, plan.release);
    match find(docker, &name, plan.run.container_port).await? {
        Found::Running(running) => return Ok(running),
        Found::Exited { container_id, .. } => remove(docker, &container_id).await,
        Found::Missing => {}
    }
    let port_key = format!("{}/tcp", plan.run.container_port);
    let labels = HashMap::from([
        (SERVICE_LABEL.to_string(), plan.service.to_string()),
        (RELEASE_LABEL.to_string(), plan.release.to_string()),
        (AGENT_LABEL.to_string(), plan.instance.to_string()),
    ]);
    // Zero means no limit, as for Docker.
    let nano_cpus = (plan.run.cpu_millis > 0).then(|| i64::try_from(plan.run.cpu_millis.saturating_mul(1_000_000)).unwrap_or(i64::MAX));
    let memory = (plan.run.memory_bytes > 0).then(|| i64::try_from(plan.run.memory_bytes).unwrap_or(i64::MAX));
    let (entrypoint, cmd) = match &plan.command {
        Some(command) => (Some(vec![]), Some(vec!["sh".to_string(), "-c".to_string(), command.clone()])),
        None => (None, None),
    };
    let body = ContainerCreateBody {
        image: Some(plan.image.clone()),
        entrypoint,
        cmd,
        env: Some(plan.env.iter().map(|(name, value)| format!("{name}={value}")).collect()),
        labels: Some(labels),
        exposed_ports: Some(vec![port_key.clone()]),
        working_dir: plan.files.map(|_| FILES_MOUNT.to_string()),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                port_key,
                Some(vec![PortBinding { host_ip: Some("127.0.0.1".to_string()), host_port: Some(String::new()) }]),
            )])),
            binds: plan.files.map(|directory| vec![format!("{}:{FILES_MOUNT}:ro", directory.display())]),
            nano_cpus,
            memory,
            memory_swap: memory,
            restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::UNLESS_STOPPED), maximum_retry_count: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(Some(CreateContainerOptionsBuilder::new().name(&name).build()), body)
        .await
        .map_err(|error| engine(&format!("cannot create the container of release {} of {}", plan.release, plan.service), error))?;
    if let Err(error) = docker.start_container(&created.id, None).await {
        let output = last_output(docker, &created.id).await;
        remove(docker, &created.id).await;
        return Err(engine(&format!("cannot start release {} of {}{output}", plan.release, plan.service), error));
    }
    // A process that dies at once (a wrong command, a missing file) is a failed start, not a
    // release that later fails its health check. Docker restarts it (unless-stopped), so a
    // restart within the settling time counts as an exit too.
    tokio::time::sleep(SETTLE).await;
    let inspected = docker
        .inspect_container(&created.id, None)
        .await
        .map_err(|error| engine(&format!("cannot inspect the container of release {} of {}", plan.release, plan.service), error))?;
    let state = inspected.state.clone().unwrap_or_default();
    let exited = !state.running.unwrap_or(false) || state.restarting.unwrap_or(false) || inspected.restart_count.unwrap_or(0) > 0;
    if exited {
        let exit_code = settle_exit_code(docker, &created.id).await.unwrap_or(state.exit_code.unwrap_or(-1));
        let output = last_output(docker, &created.id).await;
        remove(docker, &created.id).await;
        return Err(ReleaseError::Job(format!(
            "release {} of {} exited right after its start with code {exit_code}{output}",
            plan.release, plan.service
        )));
    }
    match find(docker, &created.id, plan.run.container_port).await? {
        Found::Running(running) => Ok(running),
        Found::Exited { exit_code, .. } => {
            let output = last_output(docker, &created.id).await;
            remove(docker, &created.id).await;
            Err(ReleaseError::Job(format!(
                "release {} of {} exited right after its start with code {exit_code}{output}",
                plan.release, plan.service
            )))
        }
        Found::Missing => {
            Err(ReleaseError::Job(format!("the container of release {} of {} vanished right after its start", plan.release, plan.service)))
        }
    }
}

/// The exit code of a container that keeps exiting: its restarts are switched off, then its
/// last run is waited for (briefly: it exits at once).
async fn settle_exit_code(docker: &Docker, container_id: &str) -> Option<i64> {
    let no_restart = ContainerUpdateBody {
        restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
        ..Default::default()
    };
    docker.update_container(container_id, no_restart).await.ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let state = docker.inspect_container(container_id, None).await.ok()?.state.unwrap_or_default();
        if !state.running.unwrap_or(false) && !state.restarting.unwrap_or(false) {
            return state.exit_code;
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `; its last output: ...` from the container's log, or nothing.
async fn last_output(docker: &Docker, container_id: &str) -> String {
    let options = LogsOptionsBuilder::new().stdout(true).stderr(true).tail("10").build();
    let mut logs = std::pin::pin!(docker.logs(container_id, Some(options)));
    let mut text = String::new();
    while let Some(Ok(piece)) = logs.next().await {
        if let LogOutput::StdOut { message } | LogOutput::StdErr { message } | LogOutput::Console { message } = piece {
            text.push_str(&String::from_utf8_lossy(&message));
        }
    }
    let text = text.trim();
    if text.is_empty() { String::new() } else { format!("; its last output: {}", text.chars().take(2000).collect::<String>()) }
}

/// Stop (SIGTERM, then SIGKILL after the grace period) and remove a container.
pub async fn stop_and_remove(docker: &Docker, container_id: &str) {
    let options = StopContainerOptionsBuilder::new().t(STOP_GRACE_SECONDS).build();
    match docker.stop_container(container_id, Some(options)).await {
        Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 304 | 404, .. }) => {}
        Err(error) => tracing::warn!(container_id, %error, "could not stop a release container; removing it by force"),
    }
    remove(docker, container_id).await;
}

async fn remove(docker: &Docker, container_id: &str) {
    let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
    match docker.remove_container(container_id, Some(options)).await {
        Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 404 | 409, .. }) => {}
        Err(error) => tracing::warn!(container_id, %error, "could not remove a release container"),
    }
}

/// Tag `image` as `repository:tag`, so that the service's images can be found (and removed).
pub async fn tag(docker: &Docker, image: &str, repository: &str, tag: &str) -> Result<(), ReleaseError> {
    let options = TagImageOptionsBuilder::new().repo(repository).tag(tag).build();
    docker.tag_image(image, Some(options)).await.map_err(|error| engine(&format!("cannot tag image {image} as {repository}:{tag}"), error))
}

/// Whether the engine has `image` (an id or a tag).
pub async fn image_exists(docker: &Docker, image: &str) -> bool {
    docker.inspect_image(image).await.is_ok()
}

/// Remove an image tag (the image itself once no tag and no container uses it).
pub async fn remove_image(docker: &Docker, image: &str) -> Result<(), String> {
    let options = RemoveImageOptionsBuilder::new().build();
    match docker.remove_image(image, Some(options), None).await {
        Ok(_) | Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
        Err(error) => Err(format!("could not remove image {image}: {error}")),
    }
}
