//! `build-latency`: how long a trivial build takes from the trigger to its start and to its end
//! on the real release binaries (`davit serve` and `davit-agent` processes with the shell
//! executor), and, in the same run on the same machine, on Buildbot (a master and workers
//! from PyPI). Then a burst: 100 builds triggered at once on 4 agents / 4 workers.
//!
//! Both systems build the same repository (a `file://` URL, or `git daemon` on 127.0.0.1), each
//! build a new commit: a checkout, then the command `true`. The sequential builds alternate
//! between the systems so that whatever else the machine does hits both alike. Everything is
//! started here in temporary directories and killed here (on drop, so also on error or Ctrl-C);
//! it never talks to anything but 127.0.0.1, and every wait is bounded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use davit_benches::harness::{
    DavitNode, Machine, ResultsSection, STARTUP_TIMEOUT, ServerProcess, command_output, davit_source, free_addresses, load_average,
    local_http_client, log_tail, machine_cpu_seconds, milliseconds, percentile, process_tree_cpu_seconds, quoted_arguments,
};
use serde_json::{Value, json};

const RESULTS: ResultsSection = ResultsSection { benchmark: "build-latency", heading: "## Build latency" };

/// The issue's targets for Davit.
const TARGET_START_P50: Duration = Duration::from_millis(20);
const TARGET_DONE_P50: Duration = Duration::from_millis(50);
const TARGET_BURST: Duration = Duration::from_millis(2500);

/// How long one build may take before the run fails (a trivial build takes well under this on
/// both systems; it bounds the run if one of them stops answering).
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(about = "Trigger-to-start and trigger-to-done of a trivial build, and 100 builds at once: Davit beside Buildbot")]
struct Arguments {
    /// The `davit` binary (`cargo build --release -p davit-coordinator`).
    #[arg(long, default_value = davit_benches::harness::DEFAULT_DAVIT_BINARY)]
    davit_binary: PathBuf,
    /// The `davit-agent` binary (`cargo build --release -p davit-agent`).
    #[arg(long, default_value = davit_benches::harness::DEFAULT_AGENT_BINARY)]
    agent_binary: PathBuf,
    /// A Python virtual environment with `pip install buildbot buildbot-worker buildbot-www`.
    #[arg(long, default_value = "/var/cache/davit-bench-venv")]
    buildbot_venv: PathBuf,
    /// Systems to measure, in this order.
    #[arg(long, value_delimiter = ',', default_value = "davit,buildbot")]
    systems: Vec<SystemKind>,
    /// Where the builds fetch the repository from.
    #[arg(long, value_enum, default_value = "file")]
    repository: RepositoryKind,
    /// Measured sequential builds per system (one at a time, each waited for).
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Sequential builds before the measured ones (connections, caches, git's first fetch).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Builds triggered at once in the burst (0 skips it).
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Agents (Davit, capacity 1 each) and workers (Buildbot, max_builds 1 each).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// The build's command (`sh -c` on the agent; a ShellCommand on the Buildbot worker).
    #[arg(long, default_value = "true")]
    build_command: String,
    /// Interval between two polls of a Davit build's state (each poll waits for its answer).
    #[arg(long, default_value_t = 2)]
    davit_poll_ms: u64,
    /// Interval between two polls of a Buildbot build's state (its figures are in seconds; a
    /// tighter poll would load its single-threaded master and slow the builds measured).
    #[arg(long, default_value_t = 50)]
    buildbot_poll_ms: u64,
    /// Interval between two polls of Davit's burst progress.
    #[arg(long, default_value_t = 10)]
    burst_poll_ms: u64,
    /// Interval between two polls of Buildbot's burst progress (each answer lists up to 100
    /// build requests, which costs its master more than a single build's state).
    #[arg(long, default_value_t = 500)]
    buildbot_burst_poll_ms: u64,
    /// How long the burst may take on one system before the run gives up on it.
    #[arg(long, default_value_t = 900)]
    burst_timeout_seconds: u64,
    /// Copy the logs of the Davit node, its agents and Buildbot's master and workers here at the
    /// end (to see where the time goes).
    #[arg(long)]
    logs_dir: Option<PathBuf>,
    /// Write the report into this markdown file's "## Build latency" section.
    #[arg(long)]
    results_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RepositoryKind {
    /// A `file://` URL (the agents are configured to allow it): no network protocol at all.
    File,
    /// `git daemon` on 127.0.0.1 (`git://`).
    GitDaemon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SystemKind {
    Davit,
    Buildbot,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    davit_benches::harness::run_until_interrupted(run(Arguments::parse())).await
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    if arguments.runs == 0 || arguments.agents == 0 || arguments.systems.is_empty() {
        bail!("--runs, --agents and --systems must each be at least 1");
    }
    if arguments.systems.contains(&SystemKind::Davit) {
        for binary in [&arguments.davit_binary, &arguments.agent_binary] {
            if !binary.is_file() {
                bail!("{} not found; build it with `cargo build --release -p davit-coordinator -p davit-agent`", binary.display());
            }
        }
    }
    let buildbot_versions =
        if arguments.systems.contains(&SystemKind::Buildbot) { Some(buildbot_versions(&arguments.buildbot_venv)?) } else { None };
    let machine = Machine::describe()?;
    eprintln!("{}", machine.render());
    let repository = Repository::start(arguments.repository)?;

    let davit_system = if arguments.systems.contains(&SystemKind::Davit) {
        Some(DavitSystem::start(&arguments, &repository).await.context("starting Davit")?)
    } else {
        None
    };
    let buildbot_system = if arguments.systems.contains(&SystemKind::Buildbot) {
        Some(Arc::new(Buildbot::start(&arguments, &repository).await.context("starting Buildbot")?))
    } else {
        None
    };
    let measured = measure(&arguments, &repository, davit_system.as_ref(), buildbot_system.as_ref()).await;
    // The logs are kept whether the measurement succeeded or not: a failure is when they matter.
    if let Some(davit) = &davit_system {
        keep_logs(&arguments, "davit", davit.processes())?;
    }
    if let Some(buildbot) = &buildbot_system {
        keep_logs(&arguments, "buildbot", std::iter::once(&buildbot.master).chain(&buildbot.workers))?;
    }
    let (davit, buildbot) = measured?;
    let report = Report { arguments: &arguments, machine: &machine, buildbot_versions, davit: davit.as_ref(), buildbot: buildbot.as_ref() };
    let markdown = report.render();
    println!("{markdown}");
    if let Some(path) = &arguments.results_file {
        RESULTS.write(path, &markdown)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clocks
// ---------------------------------------------------------------------------------------------

/// Wall-clock time in milliseconds since the epoch, with sub-millisecond precision: what the
/// trigger is stamped with, to compare with the millisecond stamps the agent and coordinator
/// write (all processes run on this one machine, on one clock).
fn wall_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as Davit's API writes it
/// (`2026-11-26T07:22:05.123Z`).
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date_parts = date.split('-').map(|part| part.parse::<i64>());
    let (year, month, day) = (date_parts.next()?.ok()?, date_parts.next()?.ok()?, date_parts.next()?.ok()?);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut clock_parts = clock.split(':').map(|part| part.parse::<i64>());
    let (hour, minute, second) = (clock_parts.next()?.ok()?, clock_parts.next()?.ok()?, clock_parts.next()?.ok()?);
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

fn stamp(value: &Value) -> Option<f64> {
    value.as_str().and_then(parse_rfc3339_ms).map(|millis| millis as f64)
}

fn from_ms(millis: f64) -> Duration {
    Duration::from_secs_f64(millis.max(0.0) / 1000.0)
}

fn sorted(mut samples: Vec<Duration>) -> Vec<Duration> {
    samples.sort_unstable();
    samples
}

// ---------------------------------------------------------------------------------------------
// The repository both systems build
// ---------------------------------------------------------------------------------------------

/// A bare repository that the builds fetch from, as a `file://` URL or served by `git daemon` on
/// a free loopback port; every build gets a commit of its own, pushed before its trigger.
struct Repository {
    _daemon: Option<ServerProcess>,
    url: String,
    work: PathBuf,
    served: PathBuf,
    commits: std::sync::atomic::AtomicU64,
    _directory: tempfile::TempDir,
}

fn git(directory: &Path, arguments: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .args(arguments)
        .current_dir(directory)
        .env("GIT_AUTHOR_NAME", "Davit Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@davit.invalid")
        .env("GIT_COMMITTER_NAME", "Davit Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@davit.invalid")
        .output()
        .context("cannot run git (is it installed?)")?;
    if !output.status.success() {
        bail!("git {arguments:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

impl Repository {
    fn start(kind: RepositoryKind) -> anyhow::Result<Self> {
        let directory = tempfile::Builder::new().prefix("davit-bench-git-").tempdir()?;
        let work = directory.path().join("work");
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "-q", "-b", "main"])?;
        std::fs::write(work.join("README"), "a trivial build\n")?;
        git(&work, &["add", "."])?;
        git(&work, &["commit", "-q", "-m", "first"])?;
        let served_root = directory.path().join("served");
        let served = served_root.join("app.git");
        std::fs::create_dir_all(&served_root)?;
        git(directory.path(), &["clone", "-q", "--bare", &work.to_string_lossy(), &served.to_string_lossy()])?;
        let (daemon, url) = match kind {
            RepositoryKind::File => (None, format!("file://{}", served.display())),
            RepositoryKind::GitDaemon => {
                let address = free_addresses(1)?.remove(0);
                let port = address.rsplit_once(':').map(|(_, port)| port.to_string()).context("a free address has a port")?;
                // `git daemon` would start `git-daemon` as its child, which killing `git` leaves
                // running: start `git-daemon` itself, so that dropping the process stops it.
                let exec_path = git(directory.path(), &["--exec-path"])?;
                let mut command = Command::new(Path::new(&exec_path).join("git-daemon"));
                command
                    .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1", &format!("--port={port}")])
                    .arg(format!("--base-path={}", served_root.display()))
                    .arg(&served_root);
                let mut daemon = ServerProcess::spawn("git daemon".into(), command, directory.path().join("git-daemon.log"))?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::net::TcpStream::connect(&address).is_err() {
                    daemon.check_running()?;
                    if Instant::now() > deadline {
                        bail!("git daemon did not listen on {address} within 10 s");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (Some(daemon), format!("git://{address}/app.git"))
            }
        };
        Ok(Repository { _daemon: daemon, url, work, served, commits: std::sync::atomic::AtomicU64::new(0), _directory: directory })
    }

    /// A new commit on `main`, pushed to the served repository (before a trigger, untimed).
    fn new_commit(&self) -> anyhow::Result<String> {
        let number = self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        std::fs::write(self.work.join("build-number"), format!("{number}\n"))?;
        git(&self.work, &["add", "build-number"])?;
        git(&self.work, &["commit", "-q", "-m", &format!("build {number}")])?;
        git(&self.work, &["push", "-q", &self.served.to_string_lossy(), "main"])?;
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

/// Copy each process's log into `--logs-dir`, if given, as `<prefix>-<process name>.log`.
fn keep_logs<'a>(arguments: &Arguments, prefix: &str, processes: impl Iterator<Item = &'a ServerProcess>) -> anyhow::Result<()> {
    let Some(directory) = &arguments.logs_dir else { return Ok(()) };
    std::fs::create_dir_all(directory)?;
    for process in processes {
        let name: String = process.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
        std::fs::copy(&process.log_path, directory.join(format!("{prefix}-{name}.log")))
            .with_context(|| format!("cannot copy {}", process.log_path.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Load on the machine while a phase runs
// ---------------------------------------------------------------------------------------------

/// What the machine did during one phase: all of its CPU, the share of the system under test
/// (its processes and the children they reaped: git, sh), and this benchmark's.
struct LoadWindow {
    started: Instant,
    machine_busy: f64,
    system: f64,
    benchmark: f64,
    load_before: String,
}

/// CPU seconds over one phase (or the sum of several windows, such as one system's builds in
/// the alternating sequence).
#[derive(Clone, Default)]
struct PhaseLoad {
    seconds: f64,
    machine_busy: f64,
    system: f64,
    benchmark: f64,
    load_before: Option<String>,
    load_after: Option<String>,
}

impl PhaseLoad {
    fn percent(&self, used: f64) -> f64 {
        100.0 * used / self.seconds.max(1e-6)
    }

    fn other(&self) -> f64 {
        (self.machine_busy - self.system - self.benchmark).max(0.0)
    }

    fn add(&mut self, window: PhaseLoad) {
        self.seconds += window.seconds;
        self.machine_busy += window.machine_busy;
        self.system += window.system;
        self.benchmark += window.benchmark;
        if self.load_before.is_none() {
            self.load_before = window.load_before;
        }
        self.load_after = window.load_after;
    }
}

fn cpu_of(pids: &[String]) -> f64 {
    pids.iter().map(|pid| process_tree_cpu_seconds(pid)).sum()
}

impl LoadWindow {
    fn open(pids: &[String]) -> Self {
        LoadWindow {
            started: Instant::now(),
            machine_busy: machine_cpu_seconds().0,
            system: cpu_of(pids),
            benchmark: process_tree_cpu_seconds("self"),
            load_before: load_average(),
        }
    }

    fn close(self, pids: &[String]) -> PhaseLoad {
        PhaseLoad {
            seconds: self.started.elapsed().as_secs_f64(),
            machine_busy: machine_cpu_seconds().0 - self.machine_busy,
            system: cpu_of(pids) - self.system,
            benchmark: process_tree_cpu_seconds("self") - self.benchmark,
            load_before: Some(self.load_before),
            load_after: Some(load_average()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Davit
// ---------------------------------------------------------------------------------------------

/// One sequential Davit build, as the client saw it and as the records stamp it.
struct DavitRun {
    /// The POST's answer (the deployment committed).
    post: Duration,
    /// First poll that showed the checkout step started.
    start_observed: Duration,
    /// First poll that showed the job succeeded.
    done_observed: Duration,
    /// Stamps relative to the trigger, in ms: job created (leader's stamp of CreateDeployment),
    /// assigned (AssignJobs), checkout started / ended and build step started / ended (the
    /// agent's clock), the attempt's end (FinishJob).
    created: f64,
    assigned: f64,
    checkout_started: f64,
    checkout_ended: f64,
    command_started: f64,
    command_ended: f64,
    finished: f64,
}

struct DavitBurst {
    builds: usize,
    wall: Duration,
    /// The last FinishJob stamp, relative to the first trigger.
    last_finish: Duration,
    /// Builds per agent id.
    per_agent: BTreeMap<u64, usize>,
    /// CPU seconds the coordinator used during the burst (the rest of `load.system` is the
    /// agents' and their git and sh processes').
    coordinator_cpu: f64,
    load: PhaseLoad,
}

struct DavitResult {
    runs: Vec<DavitRun>,
    sequential_load: PhaseLoad,
    burst: Option<DavitBurst>,
    agent_binary: PathBuf,
}

struct AgentProcess {
    process: ServerProcess,
    _directory: tempfile::TempDir,
}

impl AgentProcess {
    fn start(binary: &Path, coordinator: &str, token: &str, name: &str) -> anyhow::Result<Self> {
        let directory = tempfile::Builder::new().prefix(&format!("davit-bench-{name}-")).tempdir()?;
        let state_dir = directory.path().join("state");
        let output = Command::new(binary)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--coordinator", coordinator, "register", "--token", token, "--name", name, "--pool", "build"])
            .output()
            .with_context(|| format!("cannot run {} register", binary.display()))?;
        if !output.status.success() {
            bail!("registering agent {name} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        // The agent's defaults, plus `file` among the protocols git may fetch with.
        let config = directory.path().join("agent.toml");
        std::fs::write(&config, "git_protocols = [\"https\", \"ssh\", \"git\", \"file\"]\n")?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--coordinator", coordinator, "run", "--executor", "shell", "--capacity", "1"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let process = ServerProcess::spawn(format!("agent {name}"), command, directory.path().join("agent.log"))?;
        Ok(AgentProcess { process, _directory: directory })
    }
}

async fn wait_for_agents(node: &DavitNode, agents: &mut [AgentProcess]) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        for agent in agents.iter_mut() {
            agent.process.check_running()?;
        }
        let listed = node.get("/api/v1/agents").await?;
        let online = listed["items"].as_array().map_or(0, |items| items.iter().filter(|agent| agent["state"] == "online").count());
        if online >= agents.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {online} of {} agents came online: {listed:#}", agents.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect_repository(node: &DavitNode, repository: &Repository) -> anyhow::Result<Value> {
    let repo = node
        .post("/api/v1/repos/connect", &json!({"repo_url": repository.url, "branch": "main", "scm_type": "github"}))
        .await
        .context("connecting the repository")?;
    Ok(repo["repo_id"].clone())
}

async fn create_pipeline(node: &DavitNode, repo_id: &Value, name: &str, build_command: &str) -> anyhow::Result<String> {
    let pipeline = node
        .post(
            "/api/v1/pipelines",
            &json!({"name": name, "repo_id": repo_id, "branch": "main", "build_command": build_command,
                    "deploy_strategy": "rolling", "build": {}}),
        )
        .await
        .context("creating the pipeline")?;
    Ok(match &pipeline["pipeline_id"] {
        Value::String(id) => id.clone(),
        other => other.to_string(),
    })
}

fn deployment_body(pipeline_id: &str, commit: &str) -> Value {
    json!({"pipeline_id": pipeline_id, "commit_hash": commit, "environment": "development"})
}

async fn davit_build(node: &DavitNode, pipeline_id: &str, commit: &str, poll: Duration) -> anyhow::Result<DavitRun> {
    let body = deployment_body(pipeline_id, commit);
    let trigger_wall = wall_ms();
    let trigger = Instant::now();
    let deployment = node.post("/api/v1/deployments", &body).await?;
    let post = trigger.elapsed();
    let deployment_id = deployment["deployment_id"].as_u64().context("the deployment answer has no deployment_id")?;
    let jobs_path = format!("/api/v1/deployments/{deployment_id}/jobs");
    let mut start_observed = None;
    let job = loop {
        let jobs = node.get(&jobs_path).await?;
        let observed = trigger.elapsed();
        let job = jobs["items"][0].clone();
        if start_observed.is_none() && !job["steps"][0]["started_at"].is_null() {
            start_observed = Some(observed);
        }
        match job["status"].as_str() {
            Some("succeeded") => break (job, observed),
            Some("queued" | "running") => {}
            _ => bail!("build of deployment {deployment_id} did not succeed: {job:#}"),
        }
        if observed > BUILD_TIMEOUT {
            bail!("build of deployment {deployment_id} did not end within {} s: {job:#}", BUILD_TIMEOUT.as_secs());
        }
        tokio::time::sleep(poll).await;
    };
    let (job, done_observed) = job;
    let relative = |value: &Value| -> anyhow::Result<f64> {
        Ok(stamp(value).with_context(|| format!("job of deployment {deployment_id} lacks a stamp: {job:#}"))? - trigger_wall)
    };
    let steps = job["steps"].as_array().context("the job has no steps")?;
    if steps.len() < 2 || steps[0]["name"] != "checkout" {
        bail!("unexpected steps (checkout and build expected): {job:#}");
    }
    Ok(DavitRun {
        post,
        start_observed: start_observed.unwrap_or(done_observed),
        done_observed,
        created: relative(&job["created_at"])?,
        assigned: relative(&job["attempts"][0]["assigned_at"])?,
        checkout_started: relative(&steps[0]["started_at"])?,
        checkout_ended: relative(&steps[0]["finished_at"])?,
        command_started: relative(&steps[1]["started_at"])?,
        command_ended: relative(&steps[1]["finished_at"])?,
        finished: relative(&job["attempts"][0]["ended_at"])?,
    })
}

/// A running Davit: one node, its agents, and the pipeline the sequential builds use.
struct DavitSystem {
    node: Arc<DavitNode>,
    agents: Vec<AgentProcess>,
    repo_id: Value,
    pipeline_id: String,
}

impl DavitSystem {
    async fn start(arguments: &Arguments, repository: &Repository) -> anyhow::Result<Self> {
        eprintln!("== Davit: one node, {} agents (shell executor, capacity 1)", arguments.agents);
        let node = Arc::new(DavitNode::start(&arguments.davit_binary, "").await?);
        let token = node.registration_token().await?;
        let mut agents = (1..=arguments.agents)
            .map(|index| AgentProcess::start(&arguments.agent_binary, &node.grpc_addr, &token, &format!("bench-agent-{index}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Err(error) = wait_for_agents(&node, &mut agents).await {
            keep_logs(arguments, "davit", std::iter::once(&node.process).chain(agents.iter().map(|agent| &agent.process)))?;
            return Err(error);
        }
        let repo_id = connect_repository(&node, repository).await?;
        let pipeline_id = create_pipeline(&node, &repo_id, "latency", &arguments.build_command).await?;
        Ok(DavitSystem { node, agents, repo_id, pipeline_id })
    }

    fn pids(&self) -> Vec<String> {
        std::iter::once(self.node.process.pid()).chain(self.agents.iter().map(|agent| agent.process.pid())).collect()
    }

    fn processes(&self) -> impl Iterator<Item = &ServerProcess> {
        std::iter::once(&self.node.process).chain(self.agents.iter().map(|agent| &agent.process))
    }
}

async fn davit_burst(
    arguments: &Arguments,
    node: &Arc<DavitNode>,
    repository: &Repository,
    repo_id: &Value,
    pids: &[String],
) -> anyhow::Result<DavitBurst> {
    let pipeline_id = create_pipeline(node, repo_id, "burst", &arguments.build_command).await?;
    let count = arguments.burst;
    let commit = repository.new_commit()?;
    let window = LoadWindow::open(pids);
    let coordinator_before = process_tree_cpu_seconds(&node.process.pid());
    let trigger_wall = wall_ms();
    let trigger = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (node, body) = (node.clone(), deployment_body(&pipeline_id, &commit));
        posts.spawn(async move { node.post("/api/v1/deployments", &body).await });
    }
    let mut deployment_ids = Vec::with_capacity(count);
    while let Some(answer) = posts.join_next().await {
        deployment_ids.push(answer??["deployment_id"].as_u64().context("a deployment answer has no deployment_id")?);
    }
    let poll = Duration::from_millis(arguments.burst_poll_ms);
    let timeout = Duration::from_secs(arguments.burst_timeout_seconds);
    let successes = format!("/api/v1/deployments?pipeline_id={pipeline_id}&status=success&limit=500");
    let wall = loop {
        let done = node.get(&successes).await?["items"].as_array().map_or(0, Vec::len);
        let observed = trigger.elapsed();
        if done >= count {
            break observed;
        }
        if observed > timeout {
            bail!("only {done} of {count} builds succeeded within {} s", timeout.as_secs());
        }
        tokio::time::sleep(poll).await;
    };
    let coordinator_cpu = process_tree_cpu_seconds(&node.process.pid()) - coordinator_before;
    let load = window.close(pids);
    let mut per_agent = BTreeMap::new();
    let mut last_finish: f64 = 0.0;
    for deployment_id in deployment_ids {
        let job = node.get(&format!("/api/v1/deployments/{deployment_id}/jobs")).await?["items"][0].clone();
        if job["status"] != "succeeded" {
            bail!("burst build of deployment {deployment_id} did not succeed: {job:#}");
        }
        let attempt = &job["attempts"][0];
        *per_agent.entry(attempt["agent_id"].as_u64().unwrap_or(0)).or_insert(0) += 1;
        last_finish = last_finish.max(stamp(&attempt["ended_at"]).unwrap_or(0.0) - trigger_wall);
    }
    Ok(DavitBurst { builds: count, wall, last_finish: from_ms(last_finish), per_agent, coordinator_cpu, load })
}

// ---------------------------------------------------------------------------------------------
// Buildbot
// ---------------------------------------------------------------------------------------------

struct BuildbotRun {
    /// The force call's answer (the build request stored).
    post: Duration,
    /// First poll that showed a build for the request (the master started it on a worker).
    start_observed: Duration,
    /// First poll that showed the build request complete.
    done_observed: Duration,
}

struct BuildbotBurst {
    builds: usize,
    wall: Duration,
    /// The last build request's `complete_at` (Buildbot's own stamp, whole seconds), relative
    /// to the first force call.
    last_complete: Duration,
    per_worker: BTreeMap<u64, usize>,
    load: PhaseLoad,
}

struct BuildbotResult {
    /// Requests the master left unanswered for 30 s during the whole measurement.
    stalls: u64,
    runs: Vec<BuildbotRun>,
    sequential_load: PhaseLoad,
    burst: Option<BuildbotBurst>,
}

/// A Buildbot master and its workers on 127.0.0.1, each in the foreground (`--nodaemon`) so
/// that dropping them kills them.
struct Buildbot {
    http: reqwest::Client,
    base: String,
    builder_id: u64,
    /// Requests the master left unanswered for 30 s (asked again).
    stalls: std::sync::atomic::AtomicU64,
    workers: Vec<ServerProcess>,
    master: ServerProcess,
    _directory: tempfile::TempDir,
}

fn buildbot_versions(venv: &Path) -> anyhow::Result<String> {
    let buildbot = venv.join("bin/buildbot");
    if !buildbot.is_file() {
        bail!(
            "{} not found; install Buildbot with `python3 -m venv {} && {}/bin/pip install buildbot buildbot-worker buildbot-www`",
            buildbot.display(),
            venv.display(),
            venv.display()
        );
    }
    let python = venv.join("bin/python");
    let versions = command_output(
        &python.to_string_lossy(),
        &[
            "-c",
            "import sys, importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in \
             ['buildbot', 'buildbot-worker', 'buildbot-www', 'Twisted', 'SQLAlchemy']) + ', Python ' + sys.version.split()[0])",
        ],
    );
    if versions.is_empty() {
        bail!("cannot read Buildbot's version from {}", python.display());
    }
    Ok(versions)
}

fn run_checked(program: &Path, arguments: &[&str], directory: &Path) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(arguments)
        .current_dir(directory)
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {arguments:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The master's configuration: a ForceScheduler and one builder doing what Davit's job does —
/// a Git checkout of the commit (Buildbot's default mode, `incremental`) and the command —
/// on workers that run one build at a time, like agents of capacity 1. Build requests are not
/// collapsed (Buildbot's default would merge the burst's identical requests into a few builds).
fn master_config(workers: usize, pb_port: &str, http_port: &str, repository_url: &str, build_command: &str) -> String {
    format!(
        r#"from buildbot.plugins import schedulers, steps, util, worker

c = BuildmasterConfig = {{}}
names = ["worker-%d" % index for index in range(1, {workers} + 1)]
c['workers'] = [worker.Worker(name, "bench-password", max_builds=1) for name in names]
c['protocols'] = {{'pb': {{'port': "tcp:{pb_port}:interface=127.0.0.1"}}}}
c['change_source'] = []
c['schedulers'] = [schedulers.ForceScheduler(name="force", builderNames=["trivial"])]
factory = util.BuildFactory()
factory.addStep(steps.Git(repourl={repository_url:?}, branch="main"))
factory.addStep(steps.ShellCommand(command=["sh", "-c", {build_command:?}]))
c['builders'] = [util.BuilderConfig(name="trivial", workernames=names, factory=factory, collapseRequests=False)]
c['title'] = "build-latency"
c['buildbotURL'] = "http://127.0.0.1:{http_port}/"
c['www'] = {{'port': "tcp:{http_port}:interface=127.0.0.1", 'plugins': {{}}}}
c['db'] = {{'db_url': "sqlite:///state.sqlite"}}
# No usage reports to buildbot.net: this benchmark talks to 127.0.0.1 only.
c['buildbotNetUsageData'] = None
"#
    )
}

impl Buildbot {
    async fn start(arguments: &Arguments, repository: &Repository) -> anyhow::Result<Self> {
        eprintln!("== Buildbot: one master, {} workers (max_builds 1)", arguments.agents);
        let directory = tempfile::Builder::new().prefix("davit-bench-buildbot-").tempdir()?;
        let (buildbot, buildbot_worker) =
            (arguments.buildbot_venv.join("bin/buildbot"), arguments.buildbot_venv.join("bin/buildbot-worker"));
        let ports: Vec<String> = free_addresses(2)?
            .into_iter()
            .map(|address| address.rsplit_once(':').map(|(_, port)| port.to_string()).unwrap_or_default())
            .collect();
        let (pb_port, http_port) = (ports[0].clone(), ports[1].clone());
        run_checked(&buildbot, &["create-master", "-q", "master"], directory.path())?;
        let config = master_config(arguments.agents, &pb_port, &http_port, &repository.url, &arguments.build_command);
        std::fs::write(directory.path().join("master/master.cfg"), config)?;
        let mut command = Command::new(&buildbot);
        command.args(["start", "--nodaemon", "master"]).current_dir(directory.path());
        let mut master = ServerProcess::spawn("buildbot master".into(), command, directory.path().join("master.out"))?;

        let http = local_http_client()?;
        let base = format!("http://127.0.0.1:{http_port}/api/v2");
        let deadline = Instant::now() + STARTUP_TIMEOUT * 2;
        let builder_id = loop {
            master.check_running()?;
            if let Ok(response) = http.get(format!("{base}/builders")).send().await
                && let Ok(builders) = response.json::<Value>().await
                && let Some(id) = builders["builders"][0]["builderid"].as_u64()
            {
                break id;
            }
            if Instant::now() > deadline {
                bail!("the Buildbot master did not answer within {} s:\n{}", (STARTUP_TIMEOUT * 2).as_secs(), log_tail(&master.log_path));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut workers = Vec::with_capacity(arguments.agents);
        for index in 1..=arguments.agents {
            let name = format!("worker-{index}");
            run_checked(
                &buildbot_worker,
                &["create-worker", "-q", &name, &format!("127.0.0.1:{pb_port}"), &name, "bench-password"],
                directory.path(),
            )?;
            let mut command = Command::new(&buildbot_worker);
            command.args(["start", "--nodaemon", &name]).current_dir(directory.path());
            workers.push(ServerProcess::spawn(format!("buildbot {name}"), command, directory.path().join(format!("{name}.out")))?);
        }
        loop {
            master.check_running()?;
            for worker in &mut workers {
                worker.check_running()?;
            }
            let listed: Value = http.get(format!("{base}/workers")).send().await?.json().await?;
            let connected = listed["workers"].as_array().map_or(0, |workers| {
                workers.iter().filter(|worker| worker["connected_to"].as_array().is_some_and(|to| !to.is_empty())).count()
            });
            if connected >= arguments.agents {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {connected} of {} Buildbot workers connected", arguments.agents);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Buildbot { http, base, builder_id, stalls: std::sync::atomic::AtomicU64::new(0), workers, master, _directory: directory })
    }

    fn pids(&self) -> Vec<String> {
        std::iter::once(self.master.pid()).chain(self.workers.iter().map(ServerProcess::pid)).collect()
    }

    /// GET a JSON answer; a request the master leaves unanswered for the client's 30 s timeout
    /// is asked again (and counted in `stalls`) until [`BUILD_TIMEOUT`] has passed.
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let answer = async {
                let response = self.http.get(format!("{}{path}", self.base)).send().await?;
                let status = response.status();
                if !status.is_success() {
                    bail!("GET {path} answered {status}: {}", response.text().await.unwrap_or_default());
                }
                Ok(response.json::<Value>().await?)
            }
            .await;
            match answer {
                Err(error)
                    if error.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_timeout)
                        && started.elapsed() < BUILD_TIMEOUT =>
                {
                    self.stalls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!("   Buildbot left GET {path} unanswered for 30 s; asking again");
                }
                answer => return answer,
            }
        }
    }

    /// Force a build through the JSON-RPC endpoint, as the web UI's "force" button does; the
    /// build request's id.
    async fn force(&self, commit: &str) -> anyhow::Result<u64> {
        let body = json!({"jsonrpc": "2.0", "method": "force", "id": 1,
                          "params": {"builderid": self.builder_id.to_string(), "branch": "main", "revision": commit}});
        let answer: Value = self.http.post(format!("{}/forceschedulers/force", self.base)).json(&body).send().await?.json().await?;
        let request_ids = answer["result"][1].as_object().with_context(|| format!("the force call failed: {answer}"))?;
        request_ids.values().next().and_then(Value::as_u64).with_context(|| format!("the force call made no build request: {answer}"))
    }
}

async fn buildbot_build(buildbot: &Buildbot, commit: &str, poll: Duration) -> anyhow::Result<BuildbotRun> {
    let trigger = Instant::now();
    let request_id = buildbot.force(commit).await?;
    let post = trigger.elapsed();
    let mut start_observed = None;
    loop {
        let observed = trigger.elapsed();
        if start_observed.is_none() {
            let builds = buildbot.get(&format!("/buildrequests/{request_id}/builds")).await?;
            if builds["builds"].as_array().is_some_and(|builds| !builds.is_empty()) {
                start_observed = Some(observed);
            }
        }
        let requests = buildbot.get(&format!("/buildrequests/{request_id}")).await?;
        let request = &requests["buildrequests"][0];
        if request["complete"] == true {
            if request["results"] != 0 {
                bail!("Buildbot build request {request_id} did not succeed: {request:#}");
            }
            let done_observed = trigger.elapsed();
            return Ok(BuildbotRun { post, start_observed: start_observed.unwrap_or(done_observed), done_observed });
        }
        if observed > BUILD_TIMEOUT {
            bail!("Buildbot build request {request_id} did not complete within {} s", BUILD_TIMEOUT.as_secs());
        }
        tokio::time::sleep(poll).await;
    }
}

/// Start the systems, warm them up, then the sequential builds alternating between the systems
/// (so that whatever else the machine does hits them alike), then each system's burst.
async fn measure(
    arguments: &Arguments,
    repository: &Repository,
    davit: Option<&DavitSystem>,
    buildbot: Option<&Arc<Buildbot>>,
) -> anyhow::Result<(Option<DavitResult>, Option<BuildbotResult>)> {
    let davit_poll = Duration::from_millis(arguments.davit_poll_ms);
    let buildbot_poll = Duration::from_millis(arguments.buildbot_poll_ms);
    for index in 0..arguments.warmup {
        if let Some(davit) = davit {
            davit_build(&davit.node, &davit.pipeline_id, &repository.new_commit()?, davit_poll)
                .await
                .with_context(|| format!("Davit's warm-up build {}", index + 1))?;
        }
        if let Some(buildbot) = buildbot {
            buildbot_build(buildbot, &repository.new_commit()?, buildbot_poll)
                .await
                .with_context(|| format!("Buildbot's warm-up build {}", index + 1))?;
        }
    }
    let (mut davit_runs, mut buildbot_runs) = (Vec::new(), Vec::new());
    let (mut davit_load, mut buildbot_load) = (PhaseLoad::default(), PhaseLoad::default());
    for index in 0..arguments.runs {
        if let Some(davit) = davit {
            let commit = repository.new_commit()?;
            let pids = davit.pids();
            let window = LoadWindow::open(&pids);
            let run = davit_build(&davit.node, &davit.pipeline_id, &commit, davit_poll)
                .await
                .with_context(|| format!("Davit's build {}", index + 1))?;
            davit_load.add(window.close(&pids));
            eprintln!(
                "   Davit build {:>2}: start {} ms (agent's stamp), done {} ms (observed)",
                index + 1,
                milliseconds(from_ms(run.checkout_started)),
                milliseconds(run.done_observed)
            );
            davit_runs.push(run);
        }
        if let Some(buildbot) = buildbot {
            let commit = repository.new_commit()?;
            let pids = buildbot.pids();
            let window = LoadWindow::open(&pids);
            let run = buildbot_build(buildbot, &commit, buildbot_poll).await.with_context(|| format!("Buildbot's build {}", index + 1))?;
            buildbot_load.add(window.close(&pids));
            eprintln!(
                "   Buildbot build {:>2}: start {} ms (observed), done {} ms (observed)",
                index + 1,
                milliseconds(run.start_observed),
                milliseconds(run.done_observed)
            );
            buildbot_runs.push(run);
        }
    }
    let davit_result = match davit {
        Some(davit) => {
            let burst = if arguments.burst > 0 {
                let burst =
                    davit_burst(arguments, &davit.node, repository, &davit.repo_id, &davit.pids()).await.context("Davit's burst")?;
                eprintln!("   Davit's burst of {}: all done after {} ms", burst.builds, milliseconds(burst.wall));
                Some(burst)
            } else {
                None
            };
            Some(DavitResult { runs: davit_runs, sequential_load: davit_load, burst, agent_binary: arguments.agent_binary.clone() })
        }
        None => None,
    };
    let buildbot_result = match buildbot {
        Some(buildbot) => {
            let burst = if arguments.burst > 0 {
                let burst = buildbot_burst(arguments, buildbot, repository, &buildbot.pids()).await.context("Buildbot's burst")?;
                eprintln!("   Buildbot's burst of {}: all done after {} ms", burst.builds, milliseconds(burst.wall));
                Some(burst)
            } else {
                None
            };
            let stalls = buildbot.stalls.load(std::sync::atomic::Ordering::Relaxed);
            Some(BuildbotResult { stalls, runs: buildbot_runs, sequential_load: buildbot_load, burst })
        }
        None => None,
    };
    Ok((davit_result, buildbot_result))
}

async fn buildbot_burst(
    arguments: &Arguments,
    buildbot: &Arc<Buildbot>,
    repository: &Repository,
    pids: &[String],
) -> anyhow::Result<BuildbotBurst> {
    let count = arguments.burst;
    let commit = repository.new_commit()?;
    let window = LoadWindow::open(pids);
    let trigger_wall = wall_ms();
    let trigger = Instant::now();
    let mut forces = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (buildbot, commit) = (buildbot.clone(), commit.clone());
        forces.spawn(async move { buildbot.force(&commit).await });
    }
    let mut request_ids = Vec::with_capacity(count);
    while let Some(answer) = forces.join_next().await {
        request_ids.push(answer??);
    }
    let first = *request_ids.iter().min().context("no build request")?;
    let last = *request_ids.iter().max().context("no build request")?;
    let poll = Duration::from_millis(arguments.buildbot_burst_poll_ms);
    let timeout = Duration::from_secs(arguments.burst_timeout_seconds);
    let query =
        format!("/buildrequests?builderid={}&complete=true&buildrequestid__ge={first}&buildrequestid__le={last}", buildbot.builder_id);
    let (wall, last_complete) = loop {
        let complete = buildbot.get(&query).await?;
        let observed = trigger.elapsed();
        let requests = complete["buildrequests"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = requests.iter().find(|request| request["results"] != 0) {
            bail!("a burst build did not succeed: {failed}");
        }
        if requests.len() >= count {
            let last = requests.iter().filter_map(|request| request["complete_at"].as_f64()).fold(0.0, f64::max);
            break (observed, from_ms(last * 1000.0 - trigger_wall));
        }
        if observed > timeout {
            bail!("only {} of {count} Buildbot builds completed within {} s", requests.len(), timeout.as_secs());
        }
        tokio::time::sleep(poll).await;
    };
    let load = window.close(pids);
    let builds =
        buildbot.get(&format!("/builds?builderid={}&buildrequestid__ge={first}&buildrequestid__le={last}", buildbot.builder_id)).await?;
    let mut per_worker = BTreeMap::new();
    for build in builds["builds"].as_array().into_iter().flatten() {
        *per_worker.entry(build["workerid"].as_u64().unwrap_or(0)).or_insert(0) += 1;
    }
    Ok(BuildbotBurst { builds: count, wall, last_complete, per_worker, load })
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

struct Report<'a> {
    arguments: &'a Arguments,
    machine: &'a Machine,
    buildbot_versions: Option<String>,
    davit: Option<&'a DavitResult>,
    buildbot: Option<&'a BuildbotResult>,
}

fn p50_p99_max(samples: &[Duration]) -> String {
    format!(
        "{} / {} / {}",
        milliseconds(percentile(samples, 0.50)),
        milliseconds(percentile(samples, 0.99)),
        milliseconds(samples.last().copied().unwrap_or_default())
    )
}

fn met(value: Duration, target: Duration) -> &'static str {
    if value <= target { "**met**" } else { "**not met**" }
}

fn load_row(phase: &str, load: &PhaseLoad) -> String {
    format!(
        "| {phase} | {:.1} | {:.0}% | {:.0}% | {:.0}% | {:.0}% | {} → {} |\n",
        load.seconds,
        load.percent(load.machine_busy),
        load.percent(load.system),
        load.percent(load.benchmark),
        load.percent(load.other()),
        load.load_before.as_deref().unwrap_or("?"),
        load.load_after.as_deref().unwrap_or("?")
    )
}

impl Report<'_> {
    fn render(&self) -> String {
        let arguments = self.arguments;
        let mut out = String::new();
        let _ = writeln!(out, "### Run of {}\n", self.machine.date);
        out.push_str(&self.machine.render());
        let _ = writeln!(
            out,
            "- Davit: `{}` (`davit serve`, one node, redb, default settings) and `{}` × {} (`run --executor shell --capacity 1`), workspace at git `{}`",
            arguments.davit_binary.display(),
            arguments.agent_binary.display(),
            arguments.agents,
            davit_source()
        );
        if let Some(versions) = &self.buildbot_versions {
            let _ = writeln!(
                out,
                "- Buildbot: {versions}; one master (SQLite, the default) and {} workers (`max_builds=1`), each started with `--nodaemon`",
                arguments.agents
            );
        }
        let _ = writeln!(
            out,
            "- The build, on both: a checkout of the build's commit of a two-file repository fetched {} (Davit: a new workspace, `git fetch --depth 1` of the commit, `git checkout`; Buildbot: its `Git` step in its default `incremental` mode, which fetches into the worker's kept checkout), then `sh -c '{}'`. Buildbot's builder has `collapseRequests=False` (its default would merge the burst's identical requests into a few builds); everything else is each system's default.",
            match arguments.repository {
                RepositoryKind::File => "from a `file://` URL (the agents' `git_protocols` allow `file`)",
                RepositoryKind::GitDaemon => "from `git daemon` on 127.0.0.1 (`git://`)",
            },
            arguments.build_command
        );
        let _ = writeln!(
            out,
            "- Sequential: {} warm-up builds per system, then {} measured, one at a time, the systems alternating build by build (each build a new commit pushed just before its trigger, untimed). Trigger = just before the request is sent (Davit: `POST /api/v1/deployments`; Buildbot: JSON-RPC `force` on `POST /api/v2/forceschedulers/force`, as its web UI does).",
            arguments.warmup, arguments.runs
        );
        let _ = writeln!(
            out,
            "  - Davit start = the `started_at` the agent stamps on the job's first step (checkout) when it begins it, read from `GET /api/v1/deployments/{{id}}/jobs`, minus the trigger's wall-clock time (same machine, same clock; the stamps are whole milliseconds, so ±1 ms). Buildbot stamps only whole seconds, so its start is observed by polling: the first answer of `GET /api/v2/buildrequests/{{id}}/builds` that lists a build (the master has started it on a worker). Davit's start observed the same way is given too."
        );
        let _ = writeln!(
            out,
            "  - Done = the first poll answer that shows the build succeeded (Davit: the job's status `succeeded` in `GET /api/v1/deployments/{{id}}/jobs`, polled every {} ms after each answer; Buildbot: `complete: true` in `GET /api/v2/buildrequests/{{id}}`, polled every {} ms after each answer, as a tighter poll would load its single-threaded master). No event stream is used on either side. Davit's done is also given as the `ended_at` the coordinator stamps on the attempt when it proposes `FinishJob`, which no poll affects.",
            arguments.davit_poll_ms, arguments.buildbot_poll_ms
        );
        if arguments.burst > 0 {
            let _ = writeln!(
                out,
                "- Burst: {} builds triggered at once (all requests sent concurrently) on {} agents / workers that each run one build at a time; wall time from the first request sent to the poll (every {} ms; Buildbot every {} ms) that finds all of them succeeded.",
                arguments.burst, arguments.agents, arguments.burst_poll_ms, arguments.buildbot_burst_poll_ms
            );
        }
        let _ = writeln!(out, "- Reproduce:\n");
        let _ = writeln!(
            out,
            "```sh\nexport CARGO_TARGET_DIR=/var/cache/davit-target\npython3 -m venv /var/cache/davit-bench-venv\n/var/cache/davit-bench-venv/bin/pip install buildbot buildbot-worker buildbot-www\ncargo build --release -p davit-coordinator -p davit-agent -p davit-benches\n$CARGO_TARGET_DIR/release/build-latency {}\n```\n",
            quoted_arguments()
        );

        // Sequential latency.
        let _ =
            writeln!(out, "#### One build at a time: trigger to start and to done (ms: p50 / p99 / max of {} builds)\n", arguments.runs);
        out.push_str("| system | trigger → start | trigger → done | request answered |\n|---|---:|---:|---:|\n");
        if let Some(davit) = self.davit {
            let start = sorted(davit.runs.iter().map(|run| from_ms(run.checkout_started)).collect());
            let observed_start = sorted(davit.runs.iter().map(|run| run.start_observed).collect());
            let done = sorted(davit.runs.iter().map(|run| run.done_observed).collect());
            let post = sorted(davit.runs.iter().map(|run| run.post).collect());
            let _ = writeln!(
                out,
                "| Davit (start: agent's stamp; done: observed by polling) | {} | {} | {} |",
                p50_p99_max(&start),
                p50_p99_max(&done),
                p50_p99_max(&post)
            );
            let finished = sorted(davit.runs.iter().map(|run| from_ms(run.finished)).collect());
            let _ = writeln!(out, "| Davit (start: observed by polling) | {} | same | same |", p50_p99_max(&observed_start));
            let _ = writeln!(out, "| Davit (done: `FinishJob` stamped) | | {} | |", p50_p99_max(&finished));
        }
        if let Some(buildbot) = self.buildbot {
            let start = sorted(buildbot.runs.iter().map(|run| run.start_observed).collect());
            let done = sorted(buildbot.runs.iter().map(|run| run.done_observed).collect());
            let post = sorted(buildbot.runs.iter().map(|run| run.post).collect());
            let _ = writeln!(
                out,
                "| Buildbot (start: observed by polling) | {} | {} | {} |",
                p50_p99_max(&start),
                p50_p99_max(&done),
                p50_p99_max(&post)
            );
        }
        out.push('\n');
        if let Some(buildbot) = self.buildbot.filter(|buildbot| buildbot.stalls > 0) {
            let _ = writeln!(
                out,
                "Buildbot's master left {} status request(s) unanswered for 30 s during the run (each was asked again; a build that stalled so is in the figures with its stall).\n",
                buildbot.stalls
            );
        }
        if let Some(davit) = self.davit {
            let start = percentile(&sorted(davit.runs.iter().map(|run| from_ms(run.checkout_started)).collect()), 0.5);
            let done = percentile(&sorted(davit.runs.iter().map(|run| run.done_observed).collect()), 0.5);
            let _ = writeln!(
                out,
                "**Targets:** Davit p50 trigger → start ≤ {} ms: {} ms, {}; p50 trigger → done ≤ {} ms: {} ms, {}.",
                TARGET_START_P50.as_millis(),
                milliseconds(start),
                met(start, TARGET_START_P50),
                TARGET_DONE_P50.as_millis(),
                milliseconds(done),
                met(done, TARGET_DONE_P50)
            );
            if let Some(buildbot) = self.buildbot {
                let buildbot_done = percentile(&sorted(buildbot.runs.iter().map(|run| run.done_observed).collect()), 0.5);
                let _ = writeln!(
                    out,
                    "Buildbot's p50 force → done: {} ms, {:.0}× Davit's.",
                    milliseconds(buildbot_done),
                    buildbot_done.as_secs_f64() / done.as_secs_f64().max(1e-9)
                );
            }
            out.push('\n');
            out.push_str(&self.davit_phases(davit));
        }

        // Burst.
        let davit_burst = self.davit.and_then(|davit| davit.burst.as_ref());
        let buildbot_burst = self.buildbot.and_then(|buildbot| buildbot.burst.as_ref());
        if davit_burst.is_some() || buildbot_burst.is_some() {
            let _ = writeln!(out, "#### {} builds at once on {} agents / workers\n", arguments.burst, arguments.agents);
            out.push_str("| system | wall time to all done | builds/s | builds per agent / worker |\n|---|---:|---:|---|\n");
            if let Some(burst) = davit_burst {
                let spread: Vec<String> = burst.per_agent.values().map(usize::to_string).collect();
                let _ = writeln!(
                    out,
                    "| Davit | {} ms (last FinishJob stamped at {} ms) | {:.1} | {} |",
                    milliseconds(burst.wall),
                    milliseconds(burst.last_finish),
                    burst.builds as f64 / burst.wall.as_secs_f64(),
                    spread.join(", ")
                );
            }
            if let Some(burst) = buildbot_burst {
                let spread: Vec<String> = burst.per_worker.values().map(usize::to_string).collect();
                let _ = writeln!(
                    out,
                    "| Buildbot | {} ms (last request's own `complete_at`, whole seconds: {:.0} s) | {:.1} | {} |",
                    milliseconds(burst.wall),
                    burst.last_complete.as_secs_f64(),
                    burst.builds as f64 / burst.wall.as_secs_f64(),
                    spread.join(", ")
                );
            }
            out.push('\n');
            if let Some(burst) = davit_burst {
                let _ = writeln!(
                    out,
                    "**Target:** Davit's {} builds on {} agents in ≤ {:.1} s: {:.2} s, {}.\n",
                    burst.builds,
                    arguments.agents,
                    TARGET_BURST.as_secs_f64(),
                    burst.wall.as_secs_f64(),
                    met(burst.wall, TARGET_BURST)
                );
                let per_build = |seconds: f64| 1000.0 * seconds / burst.builds as f64;
                let _ = writeln!(
                    out,
                    "CPU per build during Davit's burst: {:.1} ms in the coordinator, {:.1} ms in the agents with their git and sh processes (the machine has {} cores).\n",
                    per_build(burst.coordinator_cpu),
                    per_build(burst.load.system - burst.coordinator_cpu),
                    self.machine.cpus
                );
            }
        }

        // Load.
        out.push_str("#### How busy the machine was\n\n");
        out.push_str(
            "CPU as a share of one core over each phase (the machine has 2 cores: 200% is all of it). \"System\" is the measured system's processes and the children they reaped (git, sh); \"other\" is everything else on the machine (another build, say), i.e. the noise. The sequential rows add up the windows of that system's own builds (the systems alternate).\n\n",
        );
        out.push_str("| phase | seconds | machine busy | system | benchmark | other | load average (1 min) before → after |\n|---|---:|---:|---:|---:|---:|---|\n");
        if let Some(davit) = self.davit {
            out.push_str(&load_row("Davit, sequential", &davit.sequential_load));
            if let Some(burst) = &davit.burst {
                out.push_str(&load_row("Davit, burst", &burst.load));
            }
        }
        if let Some(buildbot) = self.buildbot {
            out.push_str(&load_row("Buildbot, sequential", &buildbot.sequential_load));
            if let Some(burst) = &buildbot.burst {
                out.push_str(&load_row("Buildbot, burst", &burst.load));
            }
        }
        out
    }

    /// Where a Davit build's time goes, from the stamps in its records (p50 of each phase).
    fn davit_phases(&self, davit: &DavitResult) -> String {
        let phase = |select: &dyn Fn(&DavitRun) -> f64| -> Duration {
            percentile(&sorted(davit.runs.iter().map(|run| from_ms(select(run))).collect()), 0.5)
        };
        let rows: Vec<(&str, &str, Duration)> = vec![
            (
                "trigger → deployment stamped",
                "REST handler, `CreateDeployment` stamped by the leader (before its Raft write)",
                phase(&|run| run.created),
            ),
            (
                "→ job assigned",
                "`CreateDeployment` durable and applied, scheduler round, `AssignJobs` stamped",
                phase(&|run| run.assigned - run.created),
            ),
            (
                "→ checkout started",
                "`AssignJobs` durable and applied, offer built and sent, agent accepts and starts",
                phase(&|run| run.checkout_started - run.assigned),
            ),
            ("checkout", "the agent's git processes", phase(&|run| run.checkout_ended - run.checkout_started)),
            ("→ build step started", "between the agent's steps", phase(&|run| run.command_started - run.checkout_ended)),
            ("build step", "`sh -c` of the command", phase(&|run| run.command_ended - run.command_started)),
            (
                "→ finish stamped",
                "log chunks stored and acknowledged, result sent, queued step records, `FinishJob` stamped",
                phase(&|run| run.finished - run.command_ended),
            ),
            (
                "→ done observed",
                "`FinishJob` durable and applied, then the next poll",
                phase(&|run| run.done_observed.as_secs_f64() * 1000.0 - run.finished),
            ),
        ];
        let mut out = String::from(
            "Where Davit's time goes (p50 of each phase over the measured builds, from the stamps in the job's record; whole milliseconds, so each ±1 ms; the p50s need not add up to the p50 total):\n\n| phase | what happens | p50 ms |\n|---|---|---:|\n",
        );
        for (name, what, duration) in rows {
            let _ = writeln!(out, "| {name} | {what} | {} |", milliseconds(duration));
        }
        let _ = writeln!(out, "\nAgents: `{}`.\n", davit.agent_binary.display());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_apis_timestamps() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("2000-03-01T00:00:01.250Z"), Some(951_868_801_250));
        assert_eq!(parse_rfc3339_ms("2026-11-26T07:22:05Z"), Some(1_795_677_725_000));
        assert_eq!(parse_rfc3339_ms("not a time"), None);
    }
}
