//! The agent's release runtime on a deploy host: per service, the releases running in Docker
//! and the traffic switch in front of them, driven one operation at a time by release jobs
//! ([`crate::job_spec::ReleaseSpec`]). It owns the service's public port; it never routes to a
//! release that is not running, never stops a release that still has requests in flight (up to
//! a bound), and never records a routing change that changes nothing.
//!
//! Flow: `JobOffer(ReleaseSpec)` -> `jobs::run_job` -> [`ReleaseManager::run`] -> (artifact
//! fetch + verify + `docker load`, container start, health probes, switch routing, stop) ->
//! [`ReleaseOutput`] in `JobResult.output_json`.
//!
//! # State on disk
//!
//! Under `<state_dir>/releases/`:
//! - `<service>.json`, one per service, written to a temporary file and renamed into place
//!   after every change:
//!   ```json
//!   {
//!     "version": 1,
//!     "service": "web-production",
//!     "public_port": 8080,
//!     "releases": [
//!       {"name": "d7", "container_id": "4f1c...", "host_port": 32771, "container_port": 8080,
//!        "image": "sha256:9a0b...", "image_tag": "davit-release/1a2b3c4d-web-production:d7",
//!        "digest": "<sha256 of the artifact>", "started_at": 1764170000000, "stopped": false}
//!     ],
//!     "weights": {"d7": 100},
//!     "history": [{"at_ms": 1764170005000, "weights": {"d7": 100}}]
//!   }
//!   ```
//!   `releases` lists every release started here, oldest first (stopped ones stay, with
//!   `stopped: true`); `weights` is the current routing in percent (releases without traffic
//!   are absent); `history` gets one entry per routing change, with the routing after it, so a
//!   weight set twice appears once. Tests read `history` to prove no host was switched twice.
//! - `artifacts/<digest>.tar.zst`: verified artifacts, by digest.
//! - `files/<digest>/`: unpacked `files` artifacts, mounted read-only into their containers.
//!
//! A restarted agent loads every `<service>.json`, finds each running release's container again
//! (a container that is gone marks its release stopped; one that runs gives its current port),
//! and binds the switch with the recorded weights. While the agent is down nothing listens on
//! the public ports (the releases keep running in Docker): restarting the agent briefly closes
//! the host's public ports. Every operation but Stats does the same first,
//! so a container that Docker restarted on a new port is routed to where it is now.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::executor::DockerExecutor;
use crate::job_spec::{ReleaseOp, ReleaseOutput, ReleaseSpec};
use crate::log_shipping::now_millis;

pub mod artifacts;
pub mod containers;
pub mod health;
pub mod state;
pub mod switch;
pub mod traffic_stats;

pub use artifacts::{ArtifactSource, ArtifactStream, CoordinatorArtifacts};
use containers::{ContainerPlan, Found};
use state::{ReleaseRecord, ServiceState};
use switch::TrafficSwitch;

/// How long a stop waits for a release's requests in flight before it stops it anyway.
pub const DRAIN_BOUND: Duration = Duration::from_secs(30);

/// Why a release operation failed: the job's own fault (the artifact is corrupt, the release
/// does not start), or this host's (Docker or the coordinator unreachable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("{0}")]
    Job(String),
    #[error("{0}")]
    Infrastructure(String),
}

/// Where an operation's progress lines go (the job's log).
pub type Progress<'a> = &'a (dyn Fn(String) + Send + Sync);

struct Service {
    state: ServiceState,
    switch: Option<TrafficSwitch>,
}

/// Every service's releases and switch on this agent. One per agent process; operations on
/// one service run one at a time, on different services concurrently.
pub struct ReleaseManager {
    releases_dir: PathBuf,
    /// Names this agent's containers apart from other agents' on the same engine.
    instance: String,
    docker: Option<DockerExecutor>,
    service_address: IpAddr,
    services: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Service>>>>,
    /// CPU and memory of each (service, release) container since this agent started sampling it.
    usage: std::sync::Mutex<HashMap<(String, String), crate::resource_usage::Usage>>,
}

/// A short name for the agent owning `state_dir`: the first 8 hex digits of the SHA-256 of its
/// absolute path. Stable across restarts, different for every agent on the machine.
pub fn instance_of(state_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let path = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
    digest.iter().take(4).map(|byte| format!("{byte:02x}")).collect()
}

impl ReleaseManager {
    /// The manager for `state_dir`, with every service found there resumed: containers found
    /// again and switches bound with their recorded weights. Problems with one service are
    /// logged and do not stop the others.
    pub async fn restore(state_dir: &Path, docker: Option<DockerExecutor>, service_address: IpAddr) -> ReleaseManager {
        let manager = ReleaseManager {
            releases_dir: state_dir.join("releases"),
            instance: instance_of(state_dir),
            docker,
            service_address,
            services: std::sync::Mutex::new(HashMap::new()),
            usage: std::sync::Mutex::new(HashMap::new()),
        };
        let Ok(entries) = std::fs::read_dir(&manager.releases_dir) else { return manager };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|extension| extension != "json") {
                continue;
            }
            let mut loaded = match state::load(&path) {
                Ok(loaded) => loaded,
                Err(error) => {
                    tracing::error!("release state not resumed: {error}");
                    continue;
                }
            };
            manager.reconcile(&mut loaded).await;
            let mut service = Service { state: loaded, switch: None };
            if service.state.public_port != 0 {
                let port = service.state.public_port;
                if let Err(error) = manager.ensure_switch(&mut service, port).await {
                    tracing::error!("{error}");
                }
            }
            if let Err(error) = state::save(&path, &service.state) {
                tracing::error!("{error}");
            }
            tracing::info!(service = %service.state.service, weights = ?service.state.weights, "release state resumed");
            let name = service.state.service.clone();
            manager.services.lock().expect("services lock").insert(name, Arc::new(tokio::sync::Mutex::new(service)));
        }
        manager
    }

    /// One sample of each of this agent's running release containers (found by their labels),
    /// also added to each release's usage. Empty without Docker.
    pub async fn sample_releases(&self) -> Vec<davit_proto::agent::ReleaseSample> {
        let Some(docker) = &self.docker else { return Vec::new() };
        let filters = HashMap::from([("label", vec![format!("{}={}", containers::AGENT_LABEL, self.instance)])]);
        let options = bollard::query_parameters::ListContainersOptionsBuilder::new().filters(&filters).build();
        let Ok(running) = docker.client().list_containers(Some(options)).await else { return Vec::new() };
        let mut samples = Vec::new();
        for container in running {
            let labels = container.labels.unwrap_or_default();
            let (Some(id), Some(service), Some(release)) =
                (container.id, labels.get(containers::SERVICE_LABEL), labels.get(containers::RELEASE_LABEL))
            else {
                continue;
            };
            let Some(sample) = crate::resource_usage::sample(docker.client(), &id).await else { continue };
            self.usage.lock().expect("usage lock").entry((service.clone(), release.clone())).or_default().record(sample);
            samples.push(davit_proto::agent::ReleaseSample {
                service: service.clone(),
                release: release.clone(),
                at: crate::log_shipping::now_millis(),
                cpu_millicores: sample.cpu_millicores,
                memory_bytes: sample.memory_bytes,
            });
        }
        samples
    }

    /// The usage of a release's container sampled so far (peak and mean), if any.
    pub fn release_usage(&self, service: &str, release: &str) -> Option<davit_proto::agent::ResourceUsage> {
        self.usage.lock().expect("usage lock").get(&(service.to_string(), release.to_string())).and_then(|usage| usage.to_proto())
    }

    /// Find each running release's container again: its port may have changed with a restart
    /// of Docker, and a container that is gone makes its release stopped.
    async fn reconcile(&self, service: &mut ServiceState) {
        let Some(docker) = &self.docker else { return };
        for release in service.releases.iter_mut().filter(|release| !release.stopped) {
            match containers::find(docker.client(), &release.container_id, release.container_port).await {
                Ok(Found::Running(running)) => release.host_port = running.host_port,
                Ok(Found::Missing) => {
                    tracing::warn!(service = %service.service, release = %release.name, "the container of this release is gone; it is stopped");
                    release.stopped = true;
                }
                // Restarting, or exited (Docker restarts it unless stopped): keep the last port.
                Ok(Found::Exited { .. }) => {}
                Err(error) => tracing::warn!(service = %service.service, release = %release.name, "{error}"),
            }
        }
    }

    /// Before an operation: find the running releases' containers again, as at a restart (Docker
    /// gives a restarted container a new port), and route to where they are now.
    async fn refresh(&self, service: &mut Service) -> Result<(), ReleaseError> {
        let before = service.state.clone();
        self.reconcile(&mut service.state).await;
        if service.state != before {
            self.save(service)?;
            apply_routing(service);
        }
        Ok(())
    }

    fn service(&self, name: &str) -> Result<Arc<tokio::sync::Mutex<Service>>, ReleaseError> {
        state::check_name("service", name).map_err(ReleaseError::Job)?;
        let mut services = self.services.lock().expect("services lock");
        if let Some(service) = services.get(name) {
            return Ok(service.clone());
        }
        // A file that did not load at start (damaged, or from a newer agent) is never overwritten.
        let path = state::state_path(&self.releases_dir, name);
        let state = if path.exists() { state::load(&path).map_err(ReleaseError::Infrastructure)? } else { ServiceState::new(name) };
        let service = Arc::new(tokio::sync::Mutex::new(Service { state, switch: None }));
        services.insert(name.to_string(), service.clone());
        Ok(service)
    }

    /// The current routing of `service` (empty for a service this agent does not know).
    pub async fn weights(&self, service: &str) -> BTreeMap<String, u8> {
        let found = self.services.lock().expect("services lock").get(service).cloned();
        match found {
            Some(service) => service.lock().await.state.weights.clone(),
            None => BTreeMap::new(),
        }
    }

    /// The public address of `service`'s switch, once bound.
    pub async fn switch_address(&self, service: &str) -> Option<SocketAddr> {
        let found = self.services.lock().expect("services lock").get(service).cloned()?;
        found.lock().await.switch.as_ref().map(TrafficSwitch::address)
    }

    /// Carry out one release operation; `env` is the release's environment (configuration and
    /// secrets), `source` where its artifact comes from.
    pub async fn run(
        &self,
        spec: &ReleaseSpec,
        env: &[(String, String)],
        source: &dyn ArtifactSource,
        progress: Progress<'_>,
    ) -> Result<ReleaseOutput, ReleaseError> {
        state::check_name("release", &spec.release).map_err(ReleaseError::Job)?;
        if let Some(previous) = &spec.previous {
            state::check_name("previous release", previous).map_err(ReleaseError::Job)?;
        }
        let service = self.service(&spec.service)?;
        let mut service = service.lock().await;
        let mut output = ReleaseOutput::default();
        if !matches!(spec.op, ReleaseOp::Stats { .. }) {
            self.refresh(&mut service).await?;
        }
        match &spec.op {
            ReleaseOp::Start => self.start(&mut service, spec, env, source, progress).await?,
            ReleaseOp::CheckHealth => {
                let release = service.state.release(&spec.release).filter(|release| !release.stopped).ok_or_else(|| not_running(spec))?;
                let report = health::check(release.host_port, &spec.health).await;
                progress(format!(
                    "release {} is {}: {}",
                    spec.release,
                    if report.healthy { "healthy" } else { "unhealthy" },
                    report.detail
                ));
                output.health = Some(report);
            }
            ReleaseOp::SetWeight { weight } => self.set_weight(&mut service, spec, *weight, progress).await?,
            ReleaseOp::StopOld => self.stop_old(&mut service, spec, progress).await?,
            ReleaseOp::StopNew => self.stop_new(&mut service, spec, progress).await?,
            ReleaseOp::Stats { since_ms } => {
                output.stats = Some(service.switch.as_ref().map(|switch| switch.stats(&spec.release, *since_ms)).unwrap_or_default());
            }
            ReleaseOp::Retire => self.retire(&mut service, progress).await?,
        }
        output.weights = service.state.weights.clone();
        Ok(output)
    }

    fn docker(&self) -> Result<&DockerExecutor, ReleaseError> {
        self.docker.as_ref().ok_or_else(|| {
            ReleaseError::Job(
                "this agent runs without Docker, and releases run in Docker containers; start Docker on this host and restart the agent \
                 (or run it with --executor docker)"
                    .to_string(),
            )
        })
    }

    fn save(&self, service: &Service) -> Result<(), ReleaseError> {
        state::save(&state::state_path(&self.releases_dir, &service.state.service), &service.state).map_err(ReleaseError::Infrastructure)
    }

    /// Bind the switch on `public_port` unless it already listens there.
    async fn ensure_switch(&self, service: &mut Service, public_port: u16) -> Result<(), ReleaseError> {
        if public_port == 0 {
            return Err(ReleaseError::Job("public_port must not be 0: the switch needs a fixed port clients can reach".to_string()));
        }
        let address = SocketAddr::new(self.service_address, public_port);
        if service.switch.as_ref().is_none_or(|switch| switch.address() != address) {
            // A switch on another port gives its port up first.
            service.switch = None;
            service.switch = Some(TrafficSwitch::bind(&service.state.service, address).await.map_err(ReleaseError::Infrastructure)?);
            service.state.public_port = public_port;
        }
        apply_routing(service);
        Ok(())
    }

    async fn start(
        &self,
        service: &mut Service,
        spec: &ReleaseSpec,
        env: &[(String, String)],
        source: &dyn ArtifactSource,
        progress: Progress<'_>,
    ) -> Result<(), ReleaseError> {
        let docker = self.docker()?;
        if !matches!(spec.artifact.kind.as_str(), "image" | "files") {
            return Err(ReleaseError::Job(format!("artifact kind {:?} cannot be released; it must be image or files", spec.artifact.kind)));
        }
        if spec.run.container_port == 0 {
            return Err(ReleaseError::Job("run.container_port must be the port the release listens on inside its container, not 0".into()));
        }
        if let Some(release) = service.state.release(&spec.release).filter(|release| !release.stopped)
            && let Found::Running(running) = containers::find(docker.client(), &release.container_id, release.container_port).await?
        {
            progress(format!(
                "release {} already runs (container {}, port {})",
                spec.release,
                short(&running.container_id),
                running.host_port
            ));
            service.state.release_mut(&spec.release).expect("found above").host_port = running.host_port;
            self.ensure_switch(service, spec.run.public_port).await?;
            return self.save(service);
        }
        let archive = artifacts::cached_artifact(&self.releases_dir.join("artifacts"), &spec.artifact.digest, source).await?;
        progress(format!("artifact sha256:{} verified", spec.artifact.digest));
        let files_dir;
        let (plan_image, image_id, image_tag, command, files) = match spec.artifact.kind.as_str() {
            "image" => {
                let repository = containers::image_repository(&self.instance, &spec.service);
                let tag = format!("{repository}:{}", spec.release);
                let image_id = self.load_image(docker, &archive, &spec.artifact.digest).await?;
                containers::tag(docker.client(), &image_id, &repository, &spec.release).await?;
                progress(format!("image {image_id} loaded as {tag}"));
                (tag.clone(), image_id, tag, spec.run.command.clone(), None)
            }
            "files" => {
                // The files are mounted in `run.image`; `run.command` starts them, else the
                // image's own command does (an image made to serve a directory).
                let Some(image) = &spec.run.image else {
                    return Err(ReleaseError::Job(
                        "a files artifact needs run.image (the image its files run in; the pipeline's deploy.run_image)".to_string(),
                    ));
                };
                files_dir = self.unpack_files(&archive, &spec.artifact.digest).await?;
                (image.clone(), image.clone(), String::new(), spec.run.command.clone(), Some(files_dir.as_path()))
            }
            other => return Err(ReleaseError::Job(format!("artifact kind {other:?} cannot be released; it must be image or files"))),
        };
        let plan = ContainerPlan {
            instance: &self.instance,
            service: &spec.service,
            release: &spec.release,
            image: plan_image,
            command,
            files,
            env,
            run: &spec.run,
        };
        let running = containers::start(docker.client(), &plan).await?;
        progress(format!("release {} started: container {}, 127.0.0.1:{}", spec.release, short(&running.container_id), running.host_port));
        let record = ReleaseRecord {
            name: spec.release.clone(),
            container_id: running.container_id,
            host_port: running.host_port,
            container_port: spec.run.container_port,
            image: image_id,
            image_tag,
            digest: spec.artifact.digest.clone(),
            started_at: now_millis(),
            stopped: false,
        };
        match service.state.release_mut(&spec.release) {
            Some(existing) => *existing = record,
            None => service.state.releases.push(record),
        }
        self.save(service)?;
        self.ensure_switch(service, spec.run.public_port).await?;
        self.save(service)
    }

    /// `docker load` the image archive unless its image is already there; returns the image id.
    async fn load_image(&self, docker: &DockerExecutor, archive: &Path, digest: &str) -> Result<String, ReleaseError> {
        let scratch = self.releases_dir.join("tmp");
        std::fs::create_dir_all(&scratch)
            .map_err(|error| ReleaseError::Infrastructure(format!("cannot create {}: {error}", scratch.display())))?;
        let tar = scratch.join(format!("{digest}-{:08x}.tar", rand::random::<u32>()));
        let (archive_owned, tar_owned) = (archive.to_path_buf(), tar.clone());
        let unpacked = tokio::task::spawn_blocking(move || artifacts::unpack_image_archive(&archive_owned, &tar_owned))
            .await
            .map_err(|error| ReleaseError::Infrastructure(format!("unpacking the image panicked: {error}")))
            .and_then(|result| result);
        let image_id = match unpacked {
            Ok(image_id) => image_id,
            Err(error) => {
                let _ = std::fs::remove_file(&tar);
                return Err(error);
            }
        };
        let loaded = if containers::image_exists(docker.client(), &image_id).await { Ok(()) } else { docker.load_image(&tar).await };
        let _ = std::fs::remove_file(&tar);
        loaded.map_err(|error| match error.kind {
            crate::executor::ErrorKind::Job => {
                ReleaseError::Job(format!("the image of artifact sha256:{digest} does not load: {}", error.message))
            }
            crate::executor::ErrorKind::Infrastructure => ReleaseError::Infrastructure(error.message),
        })?;
        if !containers::image_exists(docker.client(), &image_id).await {
            return Err(ReleaseError::Job(format!(
                "artifact sha256:{digest} loaded, but the image {image_id} its manifest names is not there"
            )));
        }
        Ok(image_id)
    }

    /// `files/<digest>/`, unpacked once (into a temporary directory renamed into place).
    async fn unpack_files(&self, archive: &Path, digest: &str) -> Result<PathBuf, ReleaseError> {
        let directory = self.releases_dir.join("files").join(digest);
        if directory.is_dir() {
            return Ok(directory);
        }
        let temporary = self.releases_dir.join("files").join(format!("{digest}.partial-{:08x}", rand::random::<u32>()));
        let (archive, temporary_owned, directory_owned) = (archive.to_path_buf(), temporary.clone(), directory.clone());
        let unpacked = tokio::task::spawn_blocking(move || {
            crate::packing::unpack(&archive, &temporary_owned).map_err(|error| ReleaseError::Job(error.0))?;
            std::fs::rename(&temporary_owned, &directory_owned).map_err(|error| {
                ReleaseError::Infrastructure(format!("cannot move the release files into {}: {error}", directory_owned.display()))
            })
        })
        .await
        .map_err(|error| ReleaseError::Infrastructure(format!("unpacking the files panicked: {error}")))
        .and_then(|result| result);
        if unpacked.is_err() {
            let _ = std::fs::remove_dir_all(&temporary);
        }
        unpacked.map(|()| directory)
    }

    async fn set_weight(&self, service: &mut Service, spec: &ReleaseSpec, weight: u8, progress: Progress<'_>) -> Result<(), ReleaseError> {
        if weight > 100 {
            return Err(ReleaseError::Job(format!("weight {weight} is a percentage and must be at most 100")));
        }
        if !service.state.is_running(&spec.release) {
            if weight == 0 {
                // Taking traffic off a release that no longer runs (it crashed, or was never
                // started here): what it had goes to the previous release, if that runs.
                return self.stop_new(service, spec, progress).await;
            }
            return Err(not_running(spec));
        }
        let mut weights = BTreeMap::new();
        match spec.previous.as_ref().filter(|previous| **previous != spec.release && service.state.is_running(previous)) {
            Some(previous) => {
                weights.insert(spec.release.clone(), weight);
                weights.insert(previous.clone(), 100 - weight);
            }
            None => {
                weights.insert(spec.release.clone(), 100);
            }
        }
        self.route(service, spec, weights, progress).await
    }

    /// Make `weights` the routing: bind the switch if needed, record the change, apply it.
    async fn route(
        &self,
        service: &mut Service,
        spec: &ReleaseSpec,
        weights: BTreeMap<String, u8>,
        progress: Progress<'_>,
    ) -> Result<(), ReleaseError> {
        self.ensure_switch(service, spec.run.public_port).await?;
        if service.state.set_weights(weights, now_millis()) {
            self.save(service)?;
            apply_routing(service);
            progress(format!("traffic of {} now goes {:?}", spec.service, service.state.weights));
        } else {
            progress(format!("traffic of {} already goes {:?}; nothing changed", spec.service, service.state.weights));
        }
        Ok(())
    }

    async fn stop_old(&self, service: &mut Service, spec: &ReleaseSpec, progress: Progress<'_>) -> Result<(), ReleaseError> {
        let old: Vec<String> = service
            .state
            .releases
            .iter()
            .filter(|release| !release.stopped && release.name != spec.release)
            .map(|release| release.name.clone())
            .collect();
        // Out of routing first: whatever weight the old releases had goes to `release`.
        let mut weights = service.state.weights.clone();
        let freed: u8 = old.iter().filter_map(|name| weights.remove(name)).sum();
        if freed > 0 {
            if !service.state.is_running(&spec.release) {
                return Err(ReleaseError::Job(format!(
                    "release {} of {} does not run here, so the old releases' traffic has nowhere to go; they are left running",
                    spec.release, spec.service
                )));
            }
            *weights.entry(spec.release.clone()).or_default() += freed;
            self.route(service, spec, weights, progress).await?;
        }
        for name in &old {
            self.stop_release(service, name, progress).await?;
        }
        self.remove_old_images(service, spec.run.keep_images, progress).await;
        self.save(service)
    }

    async fn stop_new(&self, service: &mut Service, spec: &ReleaseSpec, progress: Progress<'_>) -> Result<(), ReleaseError> {
        let mut weights = service.state.weights.clone();
        if let Some(freed) = weights.remove(&spec.release) {
            if let Some(previous) = spec.previous.as_ref().filter(|previous| service.state.is_running(previous)) {
                *weights.entry(previous.clone()).or_default() += freed;
            }
            self.route(service, spec, weights, progress).await?;
        }
        if service.state.is_running(&spec.release) {
            self.stop_release(service, &spec.release, progress).await?;
        }
        self.save(service)
    }

    /// Take the whole service down: no traffic, no releases, no port, no images, no state file.
    /// The service's entry stays (empty), so an operation waiting for it finds a clean slate.
    async fn retire(&self, service: &mut Service, progress: Progress<'_>) -> Result<(), ReleaseError> {
        let running: Vec<String> =
            service.state.releases.iter().filter(|release| !release.stopped).map(|release| release.name.clone()).collect();
        if service.state.releases.is_empty() && service.switch.is_none() {
            progress(format!("service {} does not run on this host; nothing to retire", service.state.service));
            return self.forget(service);
        }
        // Out of routing first, so that no new request reaches a release being stopped.
        if service.state.set_weights(BTreeMap::new(), now_millis()) {
            self.save(service)?;
            apply_routing(service);
        }
        for name in &running {
            self.stop_release(service, name, progress).await?;
        }
        if let Some(switch) = service.switch.take() {
            progress(format!("port {} of {} given up", switch.address(), service.state.service));
        }
        self.remove_old_images(service, 0, progress).await;
        progress(format!("service {} retired: {} release(s) stopped", service.state.service, running.len()));
        self.forget(service)
    }

    /// Drop what is recorded of `service` (its state file too), keeping an empty entry.
    fn forget(&self, service: &mut Service) -> Result<(), ReleaseError> {
        let path = state::state_path(&self.releases_dir, &service.state.service);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(ReleaseError::Infrastructure(format!("cannot remove {}: {error}", path.display()))),
        }
        service.state = ServiceState::new(&service.state.service);
        Ok(())
    }

    /// Stop a release that takes no traffic any more, once its requests in flight are answered.
    async fn stop_release(&self, service: &mut Service, name: &str, progress: Progress<'_>) -> Result<(), ReleaseError> {
        let docker = self.docker()?;
        if let Some(switch) = &service.switch
            && !switch.drain(name, DRAIN_BOUND).await
        {
            progress(format!(
                "release {name} still had {} requests in flight after {} s; stopping it anyway",
                switch.in_flight(name),
                DRAIN_BOUND.as_secs()
            ));
        }
        let container_id = service.state.release(name).map(|release| release.container_id.clone()).unwrap_or_default();
        containers::stop_and_remove(docker.client(), &container_id).await;
        if let Some(release) = service.state.release_mut(name) {
            release.stopped = true;
        }
        self.save(service)?;
        apply_routing(service);
        progress(format!("release {name} stopped and its container removed"));
        Ok(())
    }

    /// Remove the images of stopped releases beyond the newest `keep_images` releases, and their
    /// cached artifacts and unpacked files, unless a release that is kept uses the same ones.
    async fn remove_old_images(&self, service: &Service, keep_images: u32, progress: Progress<'_>) {
        let Ok(docker) = self.docker() else { return };
        let mut newest_first: Vec<&ReleaseRecord> = service.state.releases.iter().collect();
        newest_first.sort_by_key(|release| std::cmp::Reverse(release.started_at));
        let is_kept = |index: usize, release: &ReleaseRecord| index < keep_images as usize || !release.stopped;
        let kept: Vec<&ReleaseRecord> =
            newest_first.iter().enumerate().filter(|(index, release)| is_kept(*index, release)).map(|(_, release)| *release).collect();
        let kept_images: Vec<&str> = kept.iter().map(|release| release.image.as_str()).collect();
        let kept_digests: Vec<&str> = kept.iter().map(|release| release.digest.as_str()).collect();
        for release in newest_first.iter().enumerate().filter(|(index, release)| !is_kept(*index, release)).map(|(_, release)| *release) {
            if !release.image_tag.is_empty() && containers::image_exists(docker.client(), &release.image_tag).await {
                match containers::remove_image(docker.client(), &release.image_tag).await {
                    Ok(()) if kept_images.contains(&release.image.as_str()) => {
                        progress(format!("untagged {} (its image is still in use)", release.image_tag))
                    }
                    Ok(()) => progress(format!("removed the image of release {} ({})", release.name, release.image_tag)),
                    Err(error) => progress(error),
                }
            }
            if !kept_digests.contains(&release.digest.as_str()) && artifacts::check_digest(&release.digest).is_ok() {
                let _ = std::fs::remove_file(self.releases_dir.join("artifacts").join(format!("{}.tar.zst", release.digest)));
                let _ = std::fs::remove_dir_all(self.releases_dir.join("files").join(&release.digest));
            }
        }
    }
}

/// Point the switch at the running releases with the recorded weights.
fn apply_routing(service: &Service) {
    let Some(switch) = &service.switch else { return };
    let ports: HashMap<String, u16> =
        service.state.releases.iter().filter(|release| !release.stopped).map(|release| (release.name.clone(), release.host_port)).collect();
    switch.set_routing(&service.state.weights, &ports);
}

fn not_running(spec: &ReleaseSpec) -> ReleaseError {
    ReleaseError::Job(format!("release {} of {} does not run on this host; start it first (op start)", spec.release, spec.service))
}

fn short(container_id: &str) -> &str {
    &container_id[..container_id.len().min(12)]
}
