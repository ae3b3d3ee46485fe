//! The release runtime against the real Docker engine: test service images built locally
//! (`FROM scratch` + Debian's static busybox running `httpd`), exported with `docker save` and
//! packed as the build packs image artifacts, then started, health-checked, switched and stopped
//! by a [`ReleaseManager`] while clients send requests through its traffic switch. Artifacts come
//! from files on disk instead of a coordinator; their digest is verified all the same. Without a
//! Docker socket these tests skip, unless DAVIT_TEST_REQUIRE_PEERS=1 makes that a failure.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use davit_agent::executor::DockerExecutor;
use davit_agent::job_spec::{HealthCheck, ReleaseArtifact, ReleaseOp, ReleaseOutput, ReleaseSpec, RunSettings};
use davit_agent::release::state::{self, ServiceState};
use davit_agent::release::{ArtifactSource, ArtifactStream, ReleaseError, ReleaseManager, instance_of};
use futures::StreamExt;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// What clients request: a CGI script that prints the version (or answers 500 in `bad`).
const APP_PATH: &str = "/cgi-bin/version";

// ---------------------------------------------------------------------------------------
// Docker and the test images

fn require_peers() -> bool {
    std::env::var("DAVIT_TEST_REQUIRE_PEERS").is_ok_and(|value| value == "1")
}

/// Docker, or `None` when there is none and the test may skip.
async fn docker_or_skip(test: &str) -> Option<DockerExecutor> {
    match DockerExecutor::connect().await {
        Ok(docker) => Some(docker),
        Err(error) if require_peers() => {
            panic!(
                "{test}: Docker is required (DAVIT_TEST_REQUIRE_PEERS=1) but it is unusable: {error}; start the Docker engine or unset DAVIT_TEST_REQUIRE_PEERS"
            )
        }
        Err(error) => {
            eprintln!("skipping {test}: {error} (set DAVIT_TEST_REQUIRE_PEERS=1 to fail instead)");
            None
        }
    }
}

fn docker_cli(arguments: &[&str]) -> String {
    let output = Command::new("docker").args(arguments).env("DOCKER_BUILDKIT", "0").output().expect("the docker command runs");
    assert!(output.status.success(), "docker {arguments:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The test service's versions: what `GET /cgi-bin/version` answers, and whether `/health` exists.
const VERSIONS: [(&str, &str, bool); 4] = [
    ("v1", "echo 'Content-Type: text/plain'; echo; echo v1", true),
    ("v2", "echo 'Content-Type: text/plain'; echo; echo v2", true),
    ("bad", "echo 'Status: 500 Internal Server Error'; echo 'Content-Type: text/plain'; echo; echo bad", true),
    ("sick", "echo 'Content-Type: text/plain'; echo; echo sick", false),
];

/// Image artifacts of every version: `.tar.zst` files named by digest in one directory.
struct Artifacts {
    directory: PathBuf,
    digests: BTreeMap<&'static str, String>,
}

/// Built once per test binary; the built images are removed again right after `docker save`
/// (saved by id, so loading them creates no tag of their own), so that what the tests run is
/// only what the release manager loaded.
fn artifacts() -> &'static Artifacts {
    static BUILT: OnceLock<Artifacts> = OnceLock::new();
    BUILT.get_or_init(|| {
        remove_artifacts_of_finished_runs();
        let directory = std::env::temp_dir().join(format!("{ARTIFACTS_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        let busybox = Path::new("/bin/busybox");
        assert!(busybox.is_file(), "the test images need Debian's static busybox at /bin/busybox: apt-get install busybox-static");
        let mut digests = BTreeMap::new();
        for (version, script, healthy) in VERSIONS {
            let context = directory.join(format!("context-{version}"));
            std::fs::create_dir_all(context.join("bin")).unwrap();
            std::fs::create_dir_all(context.join("www/cgi-bin")).unwrap();
            std::fs::copy(busybox, context.join("bin/busybox")).unwrap();
            std::os::unix::fs::symlink("busybox", context.join("bin/sh")).unwrap();
            std::fs::write(context.join("www/cgi-bin/version"), format!("#!/bin/busybox sh\n{script}\n")).unwrap();
            set_executable(&context.join("www/cgi-bin/version"));
            if healthy {
                std::fs::write(context.join("www/health"), "ok\n").unwrap();
            }
            std::fs::write(
                context.join("Dockerfile"),
                "FROM scratch\nCOPY bin /bin\nCOPY www /www\nEXPOSE 8080\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
            )
            .unwrap();
            let tag = format!("davit-release-test-{}-{version}", std::process::id());
            docker_cli(&["build", "-q", "-t", &tag, context.to_str().unwrap()]);
            let id = docker_cli(&["image", "inspect", "--format", "{{.Id}}", &tag]);
            let tar = directory.join(format!("{version}.tar"));
            docker_cli(&["save", "-o", tar.to_str().unwrap(), &id]);
            docker_cli(&["rmi", &tag]);
            let packed = davit_agent::packing::pack_tar_file(&tar, &directory.join(format!("{version}.packing.tar.zst"))).unwrap();
            std::fs::rename(&packed.path, directory.join(format!("{}.tar.zst", packed.digest))).unwrap();
            digests.insert(version, packed.digest);
            let _ = std::fs::remove_file(&tar);
            let _ = std::fs::remove_dir_all(&context);
        }
        Artifacts { directory, digests }
    })
}

const ARTIFACTS_PREFIX: &str = "davit-release-artifacts-";

/// The artifacts of earlier test runs whose process is gone (a test binary cannot remove its
/// own at exit).
fn remove_artifacts_of_finished_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix(ARTIFACTS_PREFIX).and_then(|pid| pid.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Artifacts read from a directory of `<digest>.tar.zst` files; `substitute` serves another
/// digest's bytes instead, as a corrupt blob store would.
struct DiskArtifacts {
    directory: PathBuf,
    substitute: Option<String>,
}

impl ArtifactSource for DiskArtifacts {
    fn fetch<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<ArtifactStream, ReleaseError>> {
        Box::pin(async move {
            let served = self.substitute.as_deref().unwrap_or(digest);
            let bytes = std::fs::read(self.directory.join(format!("{served}.tar.zst")))
                .map_err(|error| ReleaseError::Job(format!("no artifact {digest} on disk: {error}")))?;
            let pieces: Vec<Result<Vec<u8>, String>> = bytes.chunks(64 * 1024).map(|piece| Ok(piece.to_vec())).collect();
            Ok(futures::stream::iter(pieces).boxed())
        })
    }
}

/// Removes the containers and images of a test's service, also when the test fails.
struct Cleanup {
    service: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let label = format!("label=davit.service={}", self.service);
        let output = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output();
        for id in output.map(|output| String::from_utf8_lossy(&output.stdout).to_string()).unwrap_or_default().split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
        let reference = format!("reference=davit-release/*-{}", self.service.to_ascii_lowercase());
        let output = Command::new("docker").args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &reference]).output();
        for image in output.map(|output| String::from_utf8_lossy(&output.stdout).to_string()).unwrap_or_default().split_whitespace() {
            let _ = Command::new("docker").args(["rmi", image]).output();
        }
    }
}

fn containers_of(service: &str) -> Vec<String> {
    let listed = docker_cli(&["ps", "-a", "--format", "{{.Names}}", "--filter", &format!("label=davit.service={service}")]);
    let mut names: Vec<String> = listed.lines().map(str::to_string).collect();
    names.sort();
    names
}

fn image_tag_exists(tag: &str) -> bool {
    Command::new("docker").args(["image", "inspect", tag]).output().is_ok_and(|output| output.status.success())
}

// ---------------------------------------------------------------------------------------
// Specs and requests

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Service {
    name: String,
    public_port: u16,
    keep_images: u32,
}

impl Service {
    fn new(test: &str) -> Service {
        Service { name: format!("t{}-{test}", std::process::id()), public_port: free_port(), keep_images: 2 }
    }

    /// A spec for `version`'s artifact; version `none` names an artifact that exists nowhere.
    fn spec(&self, op: ReleaseOp, release: &str, previous: Option<&str>, version: &str) -> ReleaseSpec {
        let digest = if version == "none" { "0".repeat(64) } else { artifacts().digests[version].clone() };
        ReleaseSpec {
            op,
            service: self.name.clone(),
            release: release.to_string(),
            previous: previous.map(str::to_string),
            artifact: ReleaseArtifact { digest, kind: "image".to_string() },
            run: RunSettings {
                container_port: 8080,
                public_port: self.public_port,
                image: None,
                command: None,
                cpu_millis: 500,
                memory_bytes: 64 * 1024 * 1024,
                keep_images: self.keep_images,
            },
            health: HealthCheck {
                http_path: Some("/health".to_string()),
                interval_ms: 100,
                timeout_ms: 1_000,
                healthy_threshold: 2,
                unhealthy_threshold: 3,
                deadline_ms: 15_000,
            },
            timeout_seconds: 60,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}{APP_PATH}", self.public_port)
    }

    fn history(&self, state_dir: &Path) -> Vec<BTreeMap<String, u8>> {
        read_state(state_dir, &self.name).history.into_iter().map(|change| change.weights).collect()
    }
}

fn read_state(state_dir: &Path, service: &str) -> ServiceState {
    state::load(&state::state_path(&state_dir.join("releases"), service)).unwrap()
}

fn source() -> DiskArtifacts {
    DiskArtifacts { directory: artifacts().directory.clone(), substitute: None }
}

async fn run(manager: &ReleaseManager, spec: &ReleaseSpec) -> Result<ReleaseOutput, ReleaseError> {
    let progress = |line: String| eprintln!("[{} {}] {line}", spec.service, spec.op.name());
    manager.run(spec, &[("GREETING".to_string(), "hello".to_string())], &source(), &progress).await
}

/// Start `release` from `version`, check that it is healthy.
async fn start_healthy(manager: &ReleaseManager, service: &Service, release: &str, version: &str) {
    run(manager, &service.spec(ReleaseOp::Start, release, None, version)).await.unwrap();
    let checked = run(manager, &service.spec(ReleaseOp::CheckHealth, release, None, version)).await.unwrap();
    let health = checked.health.unwrap();
    assert!(health.healthy, "release {release} ({version}) should be healthy: {}", health.detail);
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// (status, body) of one request.
async fn get(client: &HttpClient, url: &str) -> Result<(u16, String), String> {
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(url.parse().unwrap()))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|error| format!("request failed: {error:?}"))?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|error| format!("body failed: {error}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
}

/// What a client loop saw.
#[derive(Default)]
struct Seen {
    answers: BTreeMap<String, u64>,
    failures: Vec<String>,
    last: String,
}

/// Clients sending requests to `url` until `stop`.
fn hammer(url: String, clients: usize, stop: Arc<AtomicBool>) -> (Arc<Mutex<Seen>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let tasks = (0..clients)
        .map(|_| {
            let (url, stop, seen, client) = (url.clone(), stop.clone(), seen.clone(), client());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let result = get(&client, &url).await;
                    let mut seen = seen.lock().unwrap();
                    match result {
                        Ok((200, body)) => {
                            *seen.answers.entry(body.clone()).or_default() += 1;
                            seen.last = body;
                        }
                        Ok((status, body)) => seen.failures.push(format!("{status} {body}")),
                        Err(error) => seen.failures.push(error),
                    }
                }
            })
        })
        .collect();
    (seen, tasks)
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switch_under_load_loses_no_request_and_cleans_up_old_images() {
    let Some(_docker) = docker_or_skip("blue_green_switch_under_load_loses_no_request_and_cleans_up_old_images").await else { return };
    let mut service = Service::new("bluegreen");
    service.keep_images = 1;
    let _cleanup = Cleanup { service: service.name.clone() };
    let state_dir = tempfile::tempdir().unwrap();
    let manager = ReleaseManager::restore(state_dir.path(), Some(_docker), LOCALHOST).await;

    // v1 alone.
    start_healthy(&manager, &service, "d1", "v1").await;
    let switched = run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d1", None, "v1")).await.unwrap();
    assert_eq!(switched.weights, BTreeMap::from([("d1".to_string(), 100)]));
    assert_eq!(get(&client(), &service.url()).await.unwrap(), (200, "v1".to_string()));
    // The same weight again (a retried job) is no routing change.
    run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d1", None, "v1")).await.unwrap();
    assert_eq!(service.history(state_dir.path()).len(), 1);

    // v2 beside it, switched to and v1 stopped, while clients keep sending requests.
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, clients) = hammer(service.url(), 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    start_healthy(&manager, &service, "d2", "v2").await;
    run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d2", Some("d1"), "v2")).await.unwrap();
    let stopped = run(&manager, &service.spec(ReleaseOp::StopOld, "d2", Some("d1"), "v2")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert!(seen.failures.is_empty(), "failed requests during the switch: {:?}", seen.failures);
    assert!(seen.answers.get("v1").is_some_and(|count| *count > 0), "v1 answered before the switch: {:?}", seen.answers);
    assert!(seen.answers.get("v2").is_some_and(|count| *count > 0), "v2 answered after it: {:?}", seen.answers);
    assert_eq!(seen.last, "v2");
    assert_eq!(stopped.weights, BTreeMap::from([("d2".to_string(), 100)]));

    // One routing change per switch, none for the repeated weight or the stop.
    let history = service.history(state_dir.path());
    assert_eq!(history, vec![BTreeMap::from([("d1".to_string(), 100)]), BTreeMap::from([("d2".to_string(), 100)])]);
    // d1's container is gone, and with keep_images 1 so is its image.
    assert_eq!(containers_of(&service.name), vec![format!("davit-release-{}-{}-d2", instance_of(state_dir.path()), service.name)]);
    assert!(!image_tag_exists(&format!("davit-release/{}-{}:d1", instance_of(state_dir.path()), service.name)));
    assert!(image_tag_exists(&format!("davit-release/{}-{}:d2", instance_of(state_dir.path()), service.name)));
    let cached = |version: &str| state_dir.path().join("releases/artifacts").join(format!("{}.tar.zst", artifacts().digests[version]));
    assert!(!cached("v1").exists() && cached("v2").exists(), "only the kept release's artifact stays cached");
    let state = read_state(state_dir.path(), &service.name);
    assert_eq!(
        state.releases.iter().map(|release| (release.name.as_str(), release.stopped)).collect::<Vec<_>>(),
        vec![("d1", true), ("d2", false)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_gets_a_tenth_of_requests_and_its_errors_are_counted_apart_and_a_restart_rebinds() {
    let Some(docker) = docker_or_skip("canary_gets_a_tenth_of_requests_and_its_errors_are_counted_apart_and_a_restart_rebinds").await
    else {
        return;
    };
    let service = Service::new("canary");
    let _cleanup = Cleanup { service: service.name.clone() };
    let state_dir = tempfile::tempdir().unwrap();
    let manager = ReleaseManager::restore(state_dir.path(), Some(docker.clone()), LOCALHOST).await;
    start_healthy(&manager, &service, "d1", "v1").await;
    run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d1", None, "v1")).await.unwrap();
    // `bad` is healthy (its /health is fine) but answers 500 to real requests.
    start_healthy(&manager, &service, "d2", "bad").await;
    let since_ms = davit_agent::log_shipping::now_millis() - 1;
    let canary = run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 10 }, "d2", Some("d1"), "bad")).await.unwrap();
    assert_eq!(canary.weights, BTreeMap::from([("d1".to_string(), 90), ("d2".to_string(), 10)]));

    let client = client();
    let mut answers: BTreeMap<(u16, String), u64> = BTreeMap::new();
    for _ in 0..200 {
        *answers.entry(get(&client, &service.url()).await.unwrap()).or_default() += 1;
    }
    assert_eq!(answers, BTreeMap::from([((200, "v1".to_string()), 180), ((500, "bad".to_string()), 20)]));
    let stats = run(&manager, &service.spec(ReleaseOp::Stats { since_ms }, "d2", Some("d1"), "bad")).await.unwrap().stats.unwrap();
    assert_eq!((stats.release.requests, stats.release.server_errors), (20, 20));
    assert_eq!((stats.others.requests, stats.others.server_errors), (180, 0));
    assert!(stats.release.latency_p95_ms > 0.0 && stats.others.latency_p95_ms > 0.0, "{stats:?}");

    // Rolled back: all traffic to d1, d2 stopped.
    let rolled_back = run(&manager, &service.spec(ReleaseOp::StopNew, "d2", Some("d1"), "bad")).await.unwrap();
    assert_eq!(rolled_back.weights, BTreeMap::from([("d1".to_string(), 100)]));
    assert_eq!(containers_of(&service.name), vec![format!("davit-release-{}-{}-d1", instance_of(state_dir.path()), service.name)]);
    for _ in 0..10 {
        assert_eq!(get(&client, &service.url()).await.unwrap(), (200, "v1".to_string()));
    }

    // A restarted agent (a new manager on the same state directory) serves the same routing.
    let history = service.history(state_dir.path());
    drop(manager);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let manager = ReleaseManager::restore(state_dir.path(), Some(docker), LOCALHOST).await;
    assert_eq!(manager.weights(&service.name).await, BTreeMap::from([("d1".to_string(), 100)]));
    assert_eq!(manager.switch_address(&service.name).await.map(|address| address.port()), Some(service.public_port));
    let client = self::client();
    for _ in 0..10 {
        assert_eq!(get(&client, &service.url()).await.unwrap(), (200, "v1".to_string()));
    }
    // Setting the same weight after the restart changes nothing either.
    run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d1", None, "v1")).await.unwrap();
    assert_eq!(service.history(state_dir.path()), history);

    // A container removed behind the agent's back makes its release stopped at the next start.
    drop(manager);
    docker_cli(&["rm", "-f", &format!("davit-release-{}-{}-d1", instance_of(state_dir.path()), service.name)]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let manager = ReleaseManager::restore(state_dir.path(), Some(docker_executor().await), LOCALHOST).await;
    assert!(read_state(state_dir.path(), &service.name).release("d1").unwrap().stopped);
    assert_eq!(get(&self::client(), &service.url()).await.unwrap().0, 503, "nothing runs that could take the traffic");
    drop(manager);
}

async fn docker_executor() -> DockerExecutor {
    DockerExecutor::connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_a_service_stops_its_releases_frees_its_port_and_forgets_it() {
    let Some(docker) = docker_or_skip("retiring_a_service_stops_its_releases_frees_its_port_and_forgets_it").await else { return };
    let service = Service::new("retire");
    let _cleanup = Cleanup { service: service.name.clone() };
    let state_dir = tempfile::tempdir().unwrap();
    let manager = ReleaseManager::restore(state_dir.path(), Some(docker), LOCALHOST).await;
    // A canary under way: d1 and d2 both run and share the traffic.
    start_healthy(&manager, &service, "d1", "v1").await;
    run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d1", None, "v1")).await.unwrap();
    start_healthy(&manager, &service, "d2", "v2").await;
    run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 50 }, "d2", Some("d1"), "v2")).await.unwrap();
    assert_eq!(containers_of(&service.name).len(), 2);
    let instance = instance_of(state_dir.path());
    let tag = |release: &str| format!("davit-release/{instance}-{}:{release}", service.name);
    assert!(image_tag_exists(&tag("d1")) && image_tag_exists(&tag("d2")));

    let retired = run(&manager, &service.spec(ReleaseOp::Retire, "d2", None, "v2")).await.unwrap();
    assert!(retired.weights.is_empty(), "no traffic goes anywhere: {:?}", retired.weights);
    assert!(containers_of(&service.name).is_empty(), "every release container is removed");
    assert!(!image_tag_exists(&tag("d1")) && !image_tag_exists(&tag("d2")), "the service's images are removed");
    assert!(manager.switch_address(&service.name).await.is_none());
    // The public port is free again: nothing of the service answers there, and it can be bound.
    assert!(get(&client(), &service.url()).await.is_err(), "nothing answers on the retired service's port");
    std::net::TcpListener::bind(("127.0.0.1", service.public_port)).expect("the retired service's port is free");
    assert!(!state::state_path(&state_dir.path().join("releases"), &service.name).exists(), "its state file is gone");
    let cached: Vec<_> = std::fs::read_dir(state_dir.path().join("releases/artifacts")).unwrap().flatten().collect();
    assert!(cached.is_empty(), "no cached artifact of the service stays: {cached:?}");

    // Retiring again (a retried job), or after a restart of the agent, is nothing to do.
    run(&manager, &service.spec(ReleaseOp::Retire, "d2", None, "v2")).await.unwrap();
    drop(manager);
    let docker = docker_executor().await;
    let restarted = ReleaseManager::restore(state_dir.path(), Some(docker), LOCALHOST).await;
    assert!(restarted.weights(&service.name).await.is_empty());
    assert!(restarted.switch_address(&service.name).await.is_none());
    run(&restarted, &service.spec(ReleaseOp::Retire, "d2", None, "v2")).await.unwrap();
    // The same service can be deployed again afterwards (a reopened pull request).
    start_healthy(&restarted, &service, "d3", "v1").await;
    run(&restarted, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d3", None, "v1")).await.unwrap();
    assert_eq!(get(&client(), &service.url()).await.unwrap(), (200, "v1".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_its_health_check_is_reported_unhealthy_and_gets_no_traffic() {
    let Some(docker) = docker_or_skip("a_release_failing_its_health_check_is_reported_unhealthy_and_gets_no_traffic").await else { return };
    let service = Service::new("sick");
    let _cleanup = Cleanup { service: service.name.clone() };
    let state_dir = tempfile::tempdir().unwrap();
    let manager = ReleaseManager::restore(state_dir.path(), Some(docker), LOCALHOST).await;
    start_healthy(&manager, &service, "d1", "v1").await;
    run(&manager, &service.spec(ReleaseOp::SetWeight { weight: 100 }, "d1", None, "v1")).await.unwrap();

    run(&manager, &service.spec(ReleaseOp::Start, "d2", Some("d1"), "sick")).await.unwrap();
    let checked = run(&manager, &service.spec(ReleaseOp::CheckHealth, "d2", Some("d1"), "sick")).await.unwrap();
    let health = checked.health.unwrap();
    assert!(!health.healthy);
    assert!(health.detail.contains("GET /health 404"), "the report says what the probes saw: {}", health.detail);
    assert_eq!(checked.weights, BTreeMap::from([("d1".to_string(), 100)]));
    let client = client();
    for _ in 0..20 {
        assert_eq!(get(&client, &service.url()).await.unwrap(), (200, "v1".to_string()));
    }
    let stopped = run(&manager, &service.spec(ReleaseOp::StopNew, "d2", Some("d1"), "sick")).await.unwrap();
    assert_eq!(stopped.weights, BTreeMap::from([("d1".to_string(), 100)]));
    assert_eq!(service.history(state_dir.path()).len(), 1, "the sick release never was in the routing");
    assert_eq!(containers_of(&service.name), vec![format!("davit-release-{}-{}-d1", instance_of(state_dir.path()), service.name)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_clearly_for_a_corrupt_artifact_and_a_release_that_exits_at_once() {
    let Some(docker) = docker_or_skip("start_fails_clearly_for_a_corrupt_artifact_and_a_release_that_exits_at_once").await else { return };
    let service = Service::new("failing");
    let _cleanup = Cleanup { service: service.name.clone() };
    let state_dir = tempfile::tempdir().unwrap();
    let manager = ReleaseManager::restore(state_dir.path(), Some(docker), LOCALHOST).await;

    // The blob store hands out v2's bytes for v1's digest.
    let corrupt = DiskArtifacts { directory: artifacts().directory.clone(), substitute: Some(artifacts().digests["v2"].clone()) };
    let spec = service.spec(ReleaseOp::Start, "d1", None, "v1");
    let error = manager.run(&spec, &[], &corrupt, &|_| {}).await.unwrap_err();
    let ReleaseError::Job(message) = &error else { panic!("a corrupt artifact is the job's failure: {error:?}") };
    assert!(message.contains("is corrupt") && message.contains(&artifacts().digests["v1"]), "{message}");
    let cached: Vec<_> = std::fs::read_dir(state_dir.path().join("releases/artifacts")).unwrap().flatten().collect();
    assert!(cached.is_empty(), "nothing unverified stays in the cache: {cached:?}");
    assert!(containers_of(&service.name).is_empty());

    // A command that exits at once.
    let mut spec = service.spec(ReleaseOp::Start, "d2", None, "v1");
    spec.run.command = Some("echo cannot open /etc/app.conf >&2; exit 3".to_string());
    let error = run(&manager, &spec).await.unwrap_err();
    let ReleaseError::Job(message) = &error else { panic!("a release that exits is the job's failure: {error:?}") };
    assert!(message.contains("exited right after its start with code 3") && message.contains("cannot open /etc/app.conf"), "{message}");
    assert!(containers_of(&service.name).is_empty());
    // Health of a release that never started is an error, not a verdict.
    assert!(run(&manager, &service.spec(ReleaseOp::CheckHealth, "d2", None, "v1")).await.is_err());
}

/// Runs `.ci/build-images` once per test binary (the `davit/build-base` image, busybox with
/// every applet), the image a `files` release runs in here.
fn ensure_base_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/build-images");
        let ran = Command::new("bash").arg(&script).output().expect("bash runs");
        assert!(ran.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&ran.stderr));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_release_runs_its_command_in_the_given_image_with_its_environment_and_limits() {
    let Some(docker) = docker_or_skip("a_files_release_runs_its_command_in_the_given_image_with_its_environment_and_limits").await else {
        return;
    };
    ensure_base_image();
    let service = Service::new("files");
    let _cleanup = Cleanup { service: service.name.clone() };
    let state_dir = tempfile::tempdir().unwrap();
    // The artifact as a build packs workspace paths.
    let workspace = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(workspace.path().join("www")).unwrap();
    std::fs::write(workspace.path().join("www/index.html"), "files v1\n").unwrap();
    std::fs::write(workspace.path().join("www/health"), "ok\n").unwrap();
    let store = tempfile::tempdir().unwrap();
    let packed = davit_agent::packing::pack(workspace.path(), &["www".to_string()], &store.path().join("packing.tar.zst")).unwrap();
    std::fs::rename(&packed.path, store.path().join(format!("{}.tar.zst", packed.digest))).unwrap();
    let source = DiskArtifacts { directory: store.path().to_path_buf(), substitute: None };

    let manager = ReleaseManager::restore(state_dir.path(), Some(docker), LOCALHOST).await;
    let mut spec = service.spec(ReleaseOp::Start, "d1", None, "none");
    spec.artifact = ReleaseArtifact { digest: packed.digest.clone(), kind: "files".to_string() };
    spec.run.image = Some("davit/build-base:latest".to_string());
    // The files are mounted read-only; the command copies them to add what the environment says.
    spec.run.command =
        Some("mkdir -p /tmp/www && cp -r /release/www/. /tmp/www/ && echo \"$GREETING\" > /tmp/www/greeting && exec httpd -f -p 8080 -h /tmp/www".into());
    let env = [("GREETING".to_string(), "hello from the configuration".to_string())];
    manager.run(&spec, &env, &source, &|_| {}).await.unwrap();
    // A repeated Start (a retried job) finds the running release.
    manager.run(&spec, &env, &source, &|_| {}).await.unwrap();
    spec.op = ReleaseOp::CheckHealth;
    let health = manager.run(&spec, &env, &source, &|_| {}).await.unwrap().health.unwrap();
    assert!(health.healthy, "{}", health.detail);
    spec.op = ReleaseOp::SetWeight { weight: 100 };
    manager.run(&spec, &env, &source, &|_| {}).await.unwrap();

    let client = client();
    let base = format!("http://127.0.0.1:{}", service.public_port);
    assert_eq!(get(&client, &format!("{base}/index.html")).await.unwrap(), (200, "files v1".to_string()));
    assert_eq!(get(&client, &format!("{base}/greeting")).await.unwrap(), (200, "hello from the configuration".to_string()));
    let instance = instance_of(state_dir.path());
    let container = format!("davit-release-{instance}-{}-d1", service.name);
    assert_eq!(containers_of(&service.name), vec![container.clone()]);
    let limits = docker_cli(&[
        "inspect",
        "--format",
        "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.RestartPolicy.Name}}",
        &container,
    ]);
    assert_eq!(limits, format!("500000000 {} unless-stopped", 64 * 1024 * 1024));
    let labels = docker_cli(&[
        "inspect",
        "--format",
        "{{index .Config.Labels \"davit.service\"}} {{index .Config.Labels \"davit.release\"}}",
        &container,
    ]);
    assert_eq!(labels, format!("{} d1", service.name));
    let published = docker_cli(&["port", &container, "8080/tcp"]);
    assert!(published.starts_with("127.0.0.1:"), "releases are published on 127.0.0.1 only: {published}");
}

#[tokio::test]
async fn an_agent_without_docker_refuses_release_steps_with_what_to_do() {
    let state_dir = tempfile::tempdir().unwrap();
    let manager = ReleaseManager::restore(state_dir.path(), None, LOCALHOST).await;
    let service = Service { name: "web-production".to_string(), public_port: free_port(), keep_images: 2 };
    let spec = service.spec(ReleaseOp::Start, "d1", None, "none");
    let error = manager.run(&spec, &[], &DiskArtifacts { directory: state_dir.path().to_path_buf(), substitute: None }, &|_| {}).await;
    let Err(ReleaseError::Job(message)) = error else { panic!("{error:?}") };
    assert!(message.contains("without Docker") && message.contains("start Docker"), "{message}");
}

#[tokio::test]
async fn a_damaged_state_file_is_reported_and_never_overwritten() {
    let state_dir = tempfile::tempdir().unwrap();
    let path = state::state_path(&state_dir.path().join("releases"), "web-production");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"{ not json").unwrap();
    let manager = ReleaseManager::restore(state_dir.path(), None, LOCALHOST).await;
    let service = Service { name: "web-production".to_string(), public_port: free_port(), keep_images: 2 };
    let spec = service.spec(ReleaseOp::SetWeight { weight: 100 }, "d1", None, "none");
    let error = manager.run(&spec, &[], &DiskArtifacts { directory: state_dir.path().to_path_buf(), substitute: None }, &|_| {}).await;
    let Err(ReleaseError::Infrastructure(message)) = error else { panic!("{error:?}") };
    assert!(message.contains("is damaged") && message.contains("move it away"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), b"{ not json");
}
