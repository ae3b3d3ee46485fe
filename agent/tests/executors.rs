//! The step executors against the real thing: the Docker executor with the local Docker
//! engine and the davit/build-base image (built by `.ci/build-images`), the shell executor
//! with real processes. Without a Docker socket the Docker tests skip, unless
//! DAVIT_TEST_REQUIRE_PEERS=1 makes that a failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveImageOptionsBuilder};
use davit_agent::executor::{DockerExecutor, ErrorKind, Limits, OutputSender, ShellExecutor, StepOutcome, StepRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const BASE_IMAGE: &str = "davit/build-base:latest";

/// Long enough for any step here that is meant to finish by itself.
const GENEROUS_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Helpers

/// A job id no other test (or earlier run) uses, so that label queries see only this test's
/// containers.
fn fresh_job_id() -> u64 {
    (1 << 40) + u64::from(rand::random::<u32>())
}

fn request<'a>(job_id: u64, step_name: &'a str, command: &'a str, workspace: &'a Path, env: &'a [(String, String)]) -> StepRequest<'a> {
    StepRequest {
        job_id,
        step_name,
        command,
        workspace,
        image: BASE_IMAGE,
        env,
        limits: Limits::default(),
        timeout: GENEROUS_TIMEOUT,
        usage: None,
    }
}

/// Collects everything a step prints; the buffer can be watched while the step runs.
struct Collected {
    bytes: Arc<Mutex<Vec<u8>>>,
    done: tokio::task::JoinHandle<()>,
}

impl Collected {
    fn new(capacity: usize) -> (OutputSender, Collected) {
        let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(capacity);
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = bytes.clone();
        let done = tokio::spawn(async move {
            while let Some(piece) = receiver.recv().await {
                sink.lock().unwrap().extend_from_slice(&piece);
            }
        });
        (sender, Collected { bytes, done })
    }

    fn text_so_far(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    async fn wait_for(&self, needle: &str, within: Duration) {
        let started = Instant::now();
        while !self.text_so_far().contains(needle) {
            assert!(started.elapsed() < within, "{needle:?} did not appear within {within:?}; output so far: {:?}", self.text_so_far());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything, once every sender is gone (the executor has returned).
    async fn all(self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.done)
            .await
            .expect("the executor kept its output sender after returning")
            .unwrap();
        String::from_utf8(Arc::try_unwrap(self.bytes).unwrap().into_inner().unwrap()).unwrap()
    }
}

fn process_is_gone(pid: i32) -> bool {
    // A zombie (state Z) has exited but waits for a parent to reap it: it counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

// ---------------------------------------------------------------------------------------
// Docker: the peer check and the base image

fn require_peers() -> bool {
    std::env::var("DAVIT_TEST_REQUIRE_PEERS").is_ok_and(|value| value == "1")
}

/// Where the Docker socket should be, if the engine is reached through one.
fn docker_socket() -> Option<PathBuf> {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => host.strip_prefix("unix://").map(PathBuf::from),
        _ => Some(PathBuf::from("/var/run/docker.sock")),
    }
}

/// Docker, or `None` when there is none and the test may skip. Also makes sure the base
/// image exists.
async fn docker_or_skip(test: &str) -> Option<(DockerExecutor, Docker)> {
    let missing = |reason: String| {
        if require_peers() {
            panic!(
                "{test}: Docker is required (DAVIT_TEST_REQUIRE_PEERS=1) but {reason}; start the Docker engine or unset DAVIT_TEST_REQUIRE_PEERS"
            );
        }
        eprintln!("skipping {test}: {reason} (set DAVIT_TEST_REQUIRE_PEERS=1 to fail instead)");
        None
    };
    if let Some(socket) = docker_socket().filter(|socket| !socket.exists()) {
        return missing(format!("there is no Docker socket at {}", socket.display()));
    }
    let executor = match DockerExecutor::connect().await {
        Ok(executor) => executor,
        Err(error) => return missing(format!("the Docker engine is unreachable: {error}")),
    };
    ensure_base_image();
    let client = Docker::connect_with_defaults().expect("a bollard client for the test's own checks");
    Some((executor, client))
}

/// Runs `.ci/build-images` once per test binary; a failure there fails every Docker test.
fn ensure_base_image() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(".ci").join("build-images");
        let ran = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|error| format!("cannot run {}: {error}", script.display()))?;
        if ran.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}):\n{}{}",
                script.display(),
                ran.status,
                String::from_utf8_lossy(&ran.stdout),
                String::from_utf8_lossy(&ran.stderr)
            ))
        }
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// The names of the containers labelled with this job, running or not.
async fn job_containers(client: &Docker, job_id: u64) -> Vec<String> {
    let filters = HashMap::from([("label", vec![format!("davit.job={job_id}")])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let containers = client.list_containers(Some(options)).await.unwrap();
    containers.into_iter().flat_map(|container| container.names.unwrap_or_default()).collect()
}

async fn assert_no_containers_left(client: &Docker, job_id: u64) {
    // Removal is awaited by run_step, so nothing should be left at all, not even briefly.
    let left = job_containers(client, job_id).await;
    assert!(left.is_empty(), "containers of job {job_id} were left behind: {left:?}");
}

/// The id of the (single) container of this job, once it exists.
async fn wait_for_job_container(client: &Docker, job_id: u64) -> String {
    let started = Instant::now();
    loop {
        if let Some(name) = job_containers(client, job_id).await.into_iter().next() {
            return name.trim_start_matches('/').to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no container of job {job_id} appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn remove_image(client: &Docker, image: &str) {
    let options = RemoveImageOptionsBuilder::new().force(true).build();
    let _ = client.remove_image(image, Some(options), None).await;
}

/// The agent runs steps on spawned tasks, so their futures must be `Send`. Checked when this
/// file compiles; never called.
#[allow(dead_code)]
fn executor_futures_are_send(docker: &DockerExecutor, shell: &ShellExecutor, step: &StepRequest<'_>, output: OutputSender) {
    fn assert_send<T: Send>(_: T) {}
    assert_send(docker.run_step(step, output.clone(), CancellationToken::new()));
    assert_send(docker.build_image(step.workspace, "Dockerfile", "tag", output.clone(), CancellationToken::new()));
    assert_send(docker.export_image("image", step.workspace));
    assert_send(docker.load_image(step.workspace));
    assert_send(docker.remove_job_containers(1));
    assert_send(shell.run_step(step, output, CancellationToken::new()));
}

// ---------------------------------------------------------------------------------------
// Docker executor

#[tokio::test]
async fn docker_step_delivers_stdout_stderr_and_exit_code() {
    let Some((executor, client)) = docker_or_skip("docker_step_delivers_stdout_stderr_and_exit_code").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    // Much more output than a pipe holds, through a channel of one piece: backpressure must
    // slow the container down, not lose bytes.
    let command =
        "echo to-stdout; echo to-stderr >&2; i=1; while [ $i -le 20000 ]; do echo line-$i; i=$((i+1)); done; printf no-newline-at-end";
    let (output, collected) = Collected::new(1);

    let outcome =
        executor.run_step(&request(job_id, "build", command, workspace.path(), &[]), output, CancellationToken::new()).await.unwrap();

    assert_eq!(outcome, StepOutcome::Exited { code: 0 });
    let text = collected.all().await;
    assert!(text.contains("to-stdout\n"), "stdout missing: {}", &text[..text.len().min(200)]);
    assert!(text.contains("to-stderr\n"), "stderr missing");
    assert_eq!(text.lines().filter(|line| line.starts_with("line-")).count(), 20_000);
    assert!(text.contains("line-20000\n"));
    assert!(text.ends_with("no-newline-at-end"), "the last bytes were lost: {:?}", &text[text.len().saturating_sub(40)..]);
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_step_reports_a_failing_exit_code() {
    let Some((executor, client)) = docker_or_skip("docker_step_reports_a_failing_exit_code").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    let (output, collected) = Collected::new(16);

    let outcome = executor
        .run_step(&request(job_id, "test", "echo failing; exit 3", workspace.path(), &[]), output, CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(outcome, StepOutcome::Exited { code: 3 });
    assert_eq!(collected.all().await, "failing\n");
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_step_receives_its_environment() {
    let Some((executor, client)) = docker_or_skip("docker_step_receives_its_environment").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    let env = vec![("GREETING".to_string(), "hello world".to_string()), ("DAVIT_TOKEN".to_string(), "a=b; c".to_string())];
    let (output, collected) = Collected::new(16);

    let outcome = executor
        .run_step(
            &request(job_id, "env", r#"echo "[$GREETING] [$DAVIT_TOKEN] [$(pwd)]""#, workspace.path(), &env),
            output,
            CancellationToken::new(),
        )
        .await
        .unwrap();

    assert_eq!(outcome, StepOutcome::Exited { code: 0 });
    assert_eq!(collected.all().await, "[hello world] [a=b; c] [/workspace]\n");
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_step_reads_and_writes_the_workspace() {
    let Some((executor, client)) = docker_or_skip("docker_step_reads_and_writes_the_workspace").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    std::fs::write(workspace.path().join("input.txt"), "from the host\n").unwrap();
    let job_id = fresh_job_id();
    let (output, collected) = Collected::new(16);
    let command = "mkdir -p out/nested && cat input.txt > out/nested/copy.txt && echo built > /workspace/out/result.txt";

    let outcome =
        executor.run_step(&request(job_id, "package", command, workspace.path(), &[]), output, CancellationToken::new()).await.unwrap();

    assert_eq!(outcome, StepOutcome::Exited { code: 0 }, "output: {}", collected.all().await);
    assert_eq!(std::fs::read_to_string(workspace.path().join("out/nested/copy.txt")).unwrap(), "from the host\n");
    assert_eq!(std::fs::read_to_string(workspace.path().join("out/result.txt")).unwrap(), "built\n");
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_step_times_out() {
    let Some((executor, client)) = docker_or_skip("docker_step_times_out").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    let (output, collected) = Collected::new(16);
    let mut step = request(job_id, "slow", "echo before; sleep 60; echo after", workspace.path(), &[]);
    step.timeout = Duration::from_secs(2);

    let started = Instant::now();
    let outcome = executor.run_step(&step, output, CancellationToken::new()).await.unwrap();

    assert_eq!(outcome, StepOutcome::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(2 + 5), "stopping took {:?}", started.elapsed());
    assert_eq!(collected.all().await, "before\n", "output from before the timeout is delivered");
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_cancellation_stops_the_container_within_five_seconds() {
    let Some((executor, client)) = docker_or_skip("docker_cancellation_stops_the_container_within_five_seconds").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    let (output, collected) = Collected::new(16);
    let cancel = CancellationToken::new();
    // `trap` makes the shell ignore SIGTERM: only a SIGKILL stops it in time.
    let command = "trap '' TERM; echo started; sleep 60 & wait; sleep 60";

    let step = async {
        let step = request(job_id, "deploy", command, workspace.path(), &[]);
        executor.run_step(&step, output, cancel.clone()).await
    };
    let watch = async {
        collected.wait_for("started", Duration::from_secs(30)).await;
        let container = wait_for_job_container(&client, job_id).await;
        let running = client.inspect_container(&container, None).await.unwrap();
        assert_eq!(running.state.and_then(|state| state.running), Some(true));
        cancel.cancel();
        Instant::now()
    };
    let (outcome, cancelled_at) = tokio::join!(step, watch);

    assert_eq!(outcome.unwrap(), StepOutcome::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_secs(5), "stopping took {:?}", cancelled_at.elapsed());
    assert_no_containers_left(&client, job_id).await;
    assert_eq!(collected.all().await, "started\n");
}

#[tokio::test]
async fn docker_step_gets_its_limits_labels_and_name() {
    let Some((executor, client)) = docker_or_skip("docker_step_gets_its_limits_labels_and_name").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    let (output, collected) = Collected::new(16);
    // What the kernel enforces, seen from inside (cgroup v2, or v1 on older hosts). The container
    // lives long enough to be found and inspected on a loaded machine.
    let command = "if [ -f /sys/fs/cgroup/cpu.max ]; then \
                       echo cpu=$(cat /sys/fs/cgroup/cpu.max); echo memory=$(cat /sys/fs/cgroup/memory.max); \
                   else \
                       echo cpu=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); \
                       echo memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes); \
                   fi; sleep 10";
    let mut step = request(job_id, "limits check", command, workspace.path(), &[]);
    step.limits = Limits { cpus: 0.5, memory_bytes: 64 * 1024 * 1024 };

    let run = executor.run_step(&step, output, CancellationToken::new());
    let inspect = async {
        let name = wait_for_job_container(&client, job_id).await;
        (name.clone(), client.inspect_container(&name, None).await.unwrap())
    };
    let (outcome, (name, container)) = tokio::join!(run, inspect);

    assert_eq!(outcome.unwrap(), StepOutcome::Exited { code: 0 });
    let text = collected.all().await;
    assert!(text.contains("cpu=50000 100000\n"), "cpu limit not applied inside: {text}");
    assert!(text.contains("memory=67108864\n"), "memory limit not applied inside: {text}");

    assert!(name.starts_with(&format!("davit-job-{job_id}-limits-check-")), "name {name}");
    let host_config = container.host_config.unwrap();
    assert_eq!(host_config.nano_cpus, Some(500_000_000));
    assert_eq!(host_config.memory, Some(64 * 1024 * 1024));
    assert_eq!(host_config.memory_swap, Some(64 * 1024 * 1024));
    let binds = host_config.binds.unwrap();
    assert_eq!(binds, vec![format!("{}:/workspace:rw", workspace.path().canonicalize().unwrap().display())]);
    let config = container.config.unwrap();
    assert_eq!(config.working_dir.as_deref(), Some("/workspace"));
    let labels = config.labels.unwrap();
    assert_eq!(labels.get("davit.job"), Some(&job_id.to_string()));
    assert_eq!(labels.get("davit.step").map(String::as_str), Some("limits check"));
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_missing_image_is_a_job_error() {
    let Some((executor, client)) = docker_or_skip("docker_missing_image_is_a_job_error").await else { return };
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    let (output, _collected) = Collected::new(16);
    let mut step = request(job_id, "build", "true", workspace.path(), &[]);
    step.image = "davit-test/no-such-image:never";

    let error = executor.run_step(&step, output, CancellationToken::new()).await.unwrap_err();

    assert_eq!(error.kind, ErrorKind::Job);
    assert!(error.message.contains("davit-test/no-such-image:never"), "{}", error.message);
    assert!(error.message.contains("build it") && error.message.contains("load it"), "{}", error.message);
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_removes_leftover_containers_of_a_job() {
    let Some((executor, client)) = docker_or_skip("docker_removes_leftover_containers_of_a_job").await else { return };
    let job_id = fresh_job_id();
    // As an agent that died mid-step would leave it: running, labelled with the job.
    let name = format!("davit-job-{job_id}-leftover");
    let body = ContainerCreateBody {
        image: Some(BASE_IMAGE.to_string()),
        cmd: Some(vec!["sleep".to_string(), "60".to_string()]),
        labels: Some(HashMap::from([("davit.job".to_string(), job_id.to_string())])),
        ..Default::default()
    };
    client.create_container(Some(CreateContainerOptionsBuilder::new().name(&name).build()), body).await.unwrap();
    client.start_container(&name, None).await.unwrap();
    assert_eq!(job_containers(&client, job_id).await.len(), 1);

    executor.remove_job_containers(job_id).await;

    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_image_build_export_and_load_round_trip() {
    let Some((executor, client)) = docker_or_skip("docker_image_build_export_and_load_round_trip").await else { return };
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {BASE_IMAGE}\nCOPY hello.txt /hello.txt\nRUN echo built-in-a-run-step > /marker\n"),
    )
    .unwrap();
    std::fs::write(context.path().join("hello.txt"), "hello from the context\n").unwrap();
    let tag = format!("davit-test/round-trip-{:08x}:latest", rand::random::<u32>());
    let (output, collected) = Collected::new(16);

    let image_id = executor.build_image(context.path(), "Dockerfile", &tag, output, CancellationToken::new()).await.unwrap();

    assert!(image_id.starts_with("sha256:"), "image id {image_id}");
    let build_output = collected.all().await;
    assert!(build_output.contains("RUN echo built-in-a-run-step"), "the build's output was not streamed: {build_output}");
    assert_eq!(client.inspect_image(&tag).await.unwrap().id.as_deref(), Some(image_id.as_str()));

    // docker save, remove, docker load: the same image comes back.
    let archives = tempfile::tempdir().unwrap();
    let archive = archives.path().join("image.tar");
    executor.export_image(&tag, &archive).await.unwrap();
    assert!(std::fs::metadata(&archive).unwrap().len() > 10_000, "the archive is too small to hold the image");
    remove_image(&client, &tag).await;
    assert!(client.inspect_image(&tag).await.is_err(), "the image should be gone before the load");
    executor.load_image(&archive).await.unwrap();
    assert_eq!(client.inspect_image(&tag).await.unwrap().id.as_deref(), Some(image_id.as_str()));

    // And a step runs in the loaded image.
    let workspace = tempfile::tempdir().unwrap();
    let job_id = fresh_job_id();
    let (output, collected) = Collected::new(16);
    let mut step = request(job_id, "verify", "cat /hello.txt /marker", workspace.path(), &[]);
    step.image = &tag;
    let outcome = executor.run_step(&step, output, CancellationToken::new()).await.unwrap();
    assert_eq!(outcome, StepOutcome::Exited { code: 0 });
    assert_eq!(collected.all().await, "hello from the context\nbuilt-in-a-run-step\n");

    remove_image(&client, &tag).await;
    assert_no_containers_left(&client, job_id).await;
}

#[tokio::test]
async fn docker_failing_build_is_a_job_error_with_the_engines_message() {
    let Some((executor, client)) = docker_or_skip("docker_failing_build_is_a_job_error_with_the_engines_message").await else { return };
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Build.dockerfile"), format!("FROM {BASE_IMAGE}\nRUN echo about to fail; exit 7\n")).unwrap();
    let tag = format!("davit-test/failing-{:08x}:latest", rand::random::<u32>());
    let (output, collected) = Collected::new(16);

    let error = executor.build_image(context.path(), "Build.dockerfile", &tag, output, CancellationToken::new()).await.unwrap_err();

    assert_eq!(error.kind, ErrorKind::Job);
    assert!(error.message.contains("7"), "the engine's message (with the exit code) is missing: {}", error.message);
    assert!(collected.all().await.contains("about to fail"));
    assert!(client.inspect_image(&tag).await.is_err());

    // A Dockerfile that is not there is the job's fault too.
    let (output, _collected) = Collected::new(16);
    let error = executor.build_image(context.path(), "Dockerfile", &tag, output, CancellationToken::new()).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Job);

    // So is an archive that is not an image.
    let archive = context.path().join("not-an-image.tar");
    std::fs::write(&archive, b"this is not a tar archive").unwrap();
    let error = executor.load_image(&archive).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Job, "{}", error.message);
}

// ---------------------------------------------------------------------------------------
// Shell executor

#[tokio::test]
async fn shell_step_delivers_stdout_stderr_and_exit_code() {
    let workspace = tempfile::tempdir().unwrap();
    let (output, collected) = Collected::new(1);
    let command =
        "echo to-stdout; echo to-stderr >&2; i=1; while [ $i -le 20000 ]; do echo line-$i; i=$((i+1)); done; printf end >&2; exit 4";

    let outcome = ShellExecutor::new()
        .run_step(&request(1, "build", command, workspace.path(), &[]), output, CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(outcome, StepOutcome::Exited { code: 4 });
    let text = collected.all().await;
    assert!(text.contains("to-stdout\n") && text.contains("to-stderr\n"));
    assert_eq!(text.lines().filter(|line| line.starts_with("line-")).count(), 20_000);
    assert!(text.contains("line-20000\n"));
    assert!(text.contains("end"));
}

#[tokio::test]
async fn shell_step_gets_only_its_own_environment_in_the_workspace() {
    let workspace = tempfile::tempdir().unwrap();
    let env = vec![("GREETING".to_string(), "hello world".to_string())];
    let (output, collected) = Collected::new(16);
    // cargo sets CARGO_MANIFEST_DIR for this test process: the step must not inherit it.
    let command =
        r#"echo "[$GREETING]"; echo "home=$HOME"; echo "pwd=$(pwd)"; echo "cargo=${CARGO_MANIFEST_DIR:-unset}"; echo made > made.txt"#;

    let outcome =
        ShellExecutor::new().run_step(&request(1, "env", command, workspace.path(), &env), output, CancellationToken::new()).await.unwrap();

    assert_eq!(outcome, StepOutcome::Exited { code: 0 });
    let workspace_path = workspace.path().display();
    let real_workspace = workspace.path().canonicalize().unwrap();
    assert_eq!(collected.all().await, format!("[hello world]\nhome={workspace_path}\npwd={}\ncargo=unset\n", real_workspace.display()));
    assert_eq!(std::fs::read_to_string(workspace.path().join("made.txt")).unwrap(), "made\n");
}

#[tokio::test]
async fn shell_step_times_out() {
    let workspace = tempfile::tempdir().unwrap();
    let (output, collected) = Collected::new(16);
    let mut step = request(1, "slow", "echo before; sleep 60; echo after", workspace.path(), &[]);
    step.timeout = Duration::from_secs(1);

    let started = Instant::now();
    let outcome = ShellExecutor::new().run_step(&step, output, CancellationToken::new()).await.unwrap();

    assert_eq!(outcome, StepOutcome::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(1 + 5), "stopping took {:?}", started.elapsed());
    assert_eq!(collected.all().await, "before\n");
}

#[tokio::test]
async fn shell_cancellation_kills_the_whole_process_group() {
    let workspace = tempfile::tempdir().unwrap();
    let (output, collected) = Collected::new(16);
    let cancel = CancellationToken::new();
    // A background child that ignores SIGTERM, and a foreground one.
    let command = "(trap '' TERM; sleep 30) & echo $! > background.pid; echo started; sleep 30";

    let step = async {
        let step = request(1, "deploy", command, workspace.path(), &[]);
        ShellExecutor::new().run_step(&step, output, cancel.clone()).await
    };
    let watch = async {
        collected.wait_for("started", Duration::from_secs(10)).await;
        cancel.cancel();
        Instant::now()
    };
    let (outcome, cancelled_at) = tokio::join!(step, watch);

    assert_eq!(outcome.unwrap(), StepOutcome::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_secs(5), "stopping took {:?}", cancelled_at.elapsed());
    let background: i32 = std::fs::read_to_string(workspace.path().join("background.pid")).unwrap().trim().parse().unwrap();
    let started = Instant::now();
    while !process_is_gone(background) {
        assert!(started.elapsed() < Duration::from_secs(5), "the background process {background} survived the cancellation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(collected.all().await, "started\n");
}

#[tokio::test]
async fn shell_step_does_not_wait_for_what_it_left_in_the_background() {
    let workspace = tempfile::tempdir().unwrap();
    let (output, collected) = Collected::new(16);
    // The background sleep keeps the output pipes open; the step is over when the shell is.
    let command = "sleep 30 & echo $! > background.pid; echo done";

    let started = Instant::now();
    let outcome = ShellExecutor::new()
        .run_step(&request(1, "leave", command, workspace.path(), &[]), output, CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(outcome, StepOutcome::Exited { code: 0 });
    assert!(started.elapsed() < Duration::from_secs(5), "the step took {:?}", started.elapsed());
    assert_eq!(collected.all().await, "done\n");
    let background: i32 = std::fs::read_to_string(workspace.path().join("background.pid")).unwrap().trim().parse().unwrap();
    let killed_by = Instant::now();
    while !process_is_gone(background) {
        assert!(killed_by.elapsed() < Duration::from_secs(5), "the background process {background} outlived its step");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
