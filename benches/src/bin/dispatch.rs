//! `dispatch`: how many build jobs per second one real `davit serve` node hands to agents, and
//! how fast, with `--agents` (default 1,000) simulated agents holding their sessions.
//!
//! The simulated agents speak the real agent protocol (register with a registration token, one
//! `Session` stream each, heartbeats) over a few shared HTTP/2 connections. Jobs are created
//! through the REST API (`POST /api/v1/deployments` of pipelines that build), by an open-loop
//! generator at a fixed rate or by closed-loop clients, in phases bounded in time and count.
//! Each agent accepts every offer at once and reports the job succeeded at once, so what is
//! measured is the path `API -> Raft -> scheduler -> Raft -> gateway -> agent`, not a build.
//!
//! Per job: the POST's answer, the offer's arrival at its agent, and the result's
//! acknowledgement. Dispatch latency is from the API's answer to the offer's arrival (an
//! offer can arrive before the answer: the API answers after the deployment's first log line
//! is stored, and the scheduler does not wait for that; such jobs count as 0 ms), and also
//! from the request's start, which includes the API's own write.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use davit_benches::harness::{
    DavitNode, Machine, ResultsSection, davit_source, milliseconds, percentile, process_cpu_seconds, quoted_arguments,
};
use davit_benches::sim_agent::{self, AgentEvent, AgentSpec, EventKind, OnOffer, SessionHandle};
use tokio::sync::mpsc;

const RESULTS: ResultsSection = ResultsSection { benchmark: "dispatch", heading: "## Dispatch" };

/// The issue's target: with 1,000 simulated agents, at least this many jobs/s dispatched with
/// p99 under this latency.
const TARGET_AGENTS: usize = 1000;
const TARGET_JOBS_PER_SECOND: f64 = 500.0;
const TARGET_P99: Duration = Duration::from_millis(100);

#[derive(Parser, Debug)]
#[command(about = "Dispatch throughput and latency of a real davit node with many simulated agents")]
struct Arguments {
    /// The `davit` binary (build it with `cargo build --release -p davit-coordinator`).
    #[arg(long, default_value = davit_benches::harness::DEFAULT_DAVIT_BINARY)]
    davit_binary: PathBuf,
    /// Simulated agents, each with its own session.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Simulated agents per gRPC connection (their sessions are HTTP/2 streams of it).
    #[arg(long, default_value_t = 25)]
    agents_per_connection: usize,
    /// Jobs each agent runs at once.
    #[arg(long, default_value_t = 1)]
    capacity: u32,
    /// Pipelines the jobs are spread over (round robin).
    #[arg(long, default_value_t = 10)]
    pipelines: usize,
    /// Load phases, in order: `open:<jobs per second>` (open loop: a job created on schedule,
    /// whatever the answers) or `closed:<clients>` (each client creates a job, waits for the
    /// answer, creates the next).
    #[arg(long, value_delimiter = ',', default_value = "open:250,open:500,closed:64")]
    loads: Vec<Load>,
    /// Load before each phase's measured window.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Length of each phase's measured window.
    #[arg(long, default_value_t = 10)]
    duration_seconds: u64,
    /// Open loop: requests without an answer, at most; a scheduled job beyond it is skipped
    /// and counted.
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
    /// Hard cap on jobs per phase, warm-up included.
    #[arg(long, default_value_t = 50_000)]
    max_jobs_per_phase: u64,
    /// Step updates each agent reports per job before its result (the real agent reports each
    /// step starting and ending).
    #[arg(long, default_value_t = 0)]
    steps: u32,
    /// After a phase, how long to wait for its jobs to be offered and finished.
    #[arg(long, default_value_t = 60)]
    settle_seconds: u64,
    /// Write the report into this markdown file's "## Dispatch" section.
    #[arg(long)]
    results_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Load {
    Open { jobs_per_second: f64 },
    Closed { clients: usize },
}

impl std::str::FromStr for Load {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("load {text:?} must be open:<jobs per second> or closed:<clients>");
        let (kind, value) = text.split_once(':').ok_or_else(invalid)?;
        match kind {
            "open" => match value.parse::<f64>() {
                Ok(rate) if rate > 0.0 => Ok(Load::Open { jobs_per_second: rate }),
                _ => Err(invalid()),
            },
            "closed" => match value.parse::<usize>() {
                Ok(clients) if clients > 0 => Ok(Load::Closed { clients }),
                _ => Err(invalid()),
            },
            _ => Err(invalid()),
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Open { jobs_per_second } => write!(formatter, "open loop, {jobs_per_second} jobs/s"),
            Load::Closed { clients } => write!(formatter, "closed loop, {clients} clients"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    davit_benches::harness::run_until_interrupted(run(Arguments::parse())).await
}

/// What the agents saw, keyed by deployment (one build job per deployment).
#[derive(Default)]
struct Observed {
    offered: HashMap<u64, Instant>,
    finished: HashMap<u64, Instant>,
    deployment_of_job: HashMap<u64, u64>,
    duplicate_offers: u64,
    /// Agents that received at least one offer.
    agents_offered: std::collections::HashSet<usize>,
    refused_results: u64,
    first_refusal: Option<String>,
    cancellations: u64,
    closed_sessions: u64,
    /// `closed_sessions` when the last phase ended (the node's stop closes every session).
    closed_sessions_before_end: u64,
    first_closure: Option<String>,
}

/// What should not happen in a run: reported whatever the figures.
struct Anomalies {
    agents_offered: usize,
    duplicate_offers: u64,
    refused_results: u64,
    first_refusal: Option<String>,
    cancellations: u64,
    closed_sessions: u64,
    first_closure: Option<String>,
}

fn collect(mut events: mpsc::UnboundedReceiver<AgentEvent>, observed: Arc<Mutex<Observed>>) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let mut observed = observed.lock().expect("observed lock");
            match event.kind {
                EventKind::Offer(offer) => {
                    observed.deployment_of_job.insert(offer.job_id, offer.deployment_id);
                    observed.agents_offered.insert(event.agent);
                    if observed.offered.insert(offer.deployment_id, event.at).is_some() {
                        observed.duplicate_offers += 1;
                    }
                }
                EventKind::ResultAck(ack) => {
                    if ack.accepted {
                        if let Some(deployment_id) = observed.deployment_of_job.get(&ack.job_id).copied() {
                            observed.finished.insert(deployment_id, event.at);
                        }
                    } else {
                        observed.refused_results += 1;
                        observed.first_refusal.get_or_insert(format!("job {}: {}", ack.job_id, ack.reason));
                    }
                }
                EventKind::Cancel(_) => observed.cancellations += 1,
                EventKind::Closed(reason) => {
                    observed.closed_sessions += 1;
                    observed.first_closure.get_or_insert(format!("agent {}: {reason}", event.agent));
                }
                EventKind::Welcome(_) => {}
            }
        }
    });
}

/// One created job as the load generator saw it.
struct Created {
    deployment_id: u64,
    /// When the request was due (open loop: its scheduled time) or started (closed loop).
    sent: Instant,
    answered: Instant,
}

struct Setup {
    register_seconds: f64,
    sessions_seconds: f64,
    idle_server_cpu_percent: f64,
    idle_server_rss: Option<u64>,
    connections: usize,
}

struct PhaseResult {
    load: Load,
    window_seconds: f64,
    /// Jobs whose request was due inside the window.
    counted: usize,
    answered_in_window: usize,
    offered_in_window: usize,
    /// Milliseconds-sorted latencies of the counted jobs.
    answer_to_offer: Vec<Duration>,
    offers_before_answer: usize,
    request_to_offer: Vec<Duration>,
    request_to_finish: Vec<Duration>,
    api_latency: Vec<Duration>,
    not_offered: usize,
    not_finished: usize,
    failed_requests: u64,
    first_failure: Option<String>,
    skipped: u64,
    server_cpu_percent: f64,
    load_generator_cpu_percent: f64,
    scheduler: SchedulerDeltas,
}

#[derive(Default)]
struct SchedulerDeltas {
    rounds_with_assignments: f64,
    assignments: f64,
    round_mean_seconds: f64,
    proposals_per_second: f64,
    proposal_mean_seconds: f64,
    fsyncs_per_second: f64,
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    if arguments.agents == 0 || arguments.agents_per_connection == 0 || arguments.pipelines == 0 || arguments.loads.is_empty() {
        bail!("--agents, --agents-per-connection, --pipelines and --loads must be at least 1");
    }
    let machine = Machine::describe()?;
    eprintln!("{}", machine.render());
    let node = DavitNode::start(&arguments.davit_binary, "[agents]\nlost_after_seconds = 120\n").await?;
    eprintln!("davit node started (pid {}), gRPC at {}", node.process.pid(), node.grpc_addr);

    let observed = Arc::new(Mutex::new(Observed::default()));
    let (sessions, setup) = start_agents(&arguments, &node, observed.clone()).await?;
    eprintln!(
        "{} agents registered in {:.1} s, sessions open in {:.1} s; idle server CPU {:.0}%, RSS {}",
        sessions.len(),
        setup.register_seconds,
        setup.sessions_seconds,
        setup.idle_server_cpu_percent,
        setup.idle_server_rss.map_or("-".to_string(), |bytes| format!("{:.0} MB", bytes as f64 / 1e6))
    );
    let pipelines = create_pipelines(&arguments, &node).await?;

    let mut results = Vec::new();
    let commit_counter = Arc::new(AtomicU64::new(0));
    for load in &arguments.loads {
        eprintln!("== {load}");
        let result = run_phase(&arguments, &node, *load, &pipelines, &commit_counter, &observed).await?;
        eprintln!("   {}", result.summary());
        results.push(result);
    }
    drop(sessions);
    drop(node);

    let anomalies = {
        let observed = observed.lock().expect("observed lock");
        Anomalies {
            agents_offered: observed.agents_offered.len(),
            duplicate_offers: observed.duplicate_offers,
            refused_results: observed.refused_results,
            first_refusal: observed.first_refusal.clone(),
            cancellations: observed.cancellations,
            // The sessions end when the node is stopped at the end; only earlier closures count.
            closed_sessions: observed.closed_sessions_before_end,
            first_closure: observed.first_closure.clone(),
        }
    };
    let report = Report { arguments: &arguments, machine: &machine, setup: &setup, results: &results, anomalies: &anomalies };
    let markdown = report.render();
    println!("{markdown}");
    if let Some(path) = &arguments.results_file {
        RESULTS.write(path, &markdown)?;
    }
    Ok(())
}

async fn start_agents(
    arguments: &Arguments,
    node: &DavitNode,
    observed: Arc<Mutex<Observed>>,
) -> anyhow::Result<(Vec<SessionHandle>, Setup)> {
    let registration_token = node.registration_token().await?;
    let connections = arguments.agents.div_ceil(arguments.agents_per_connection);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(sim_agent::connect(&node.grpc_addr).await?);
    }
    let spec = AgentSpec {
        capacity: arguments.capacity,
        labels: [("pool".to_string(), "build".to_string())].into(),
        executors: vec!["shell".to_string()],
    };
    // Registration and session opening are Raft writes each: a bounded number at once.
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let started = Instant::now();
    let mut registering = tokio::task::JoinSet::new();
    for agent in 0..arguments.agents {
        let channel = channels[agent / arguments.agents_per_connection].clone();
        let (token, labels, limit) = (registration_token.clone(), spec.labels.clone(), limit.clone());
        registering.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            anyhow::Ok((agent, sim_agent::register(&channel, &token, &format!("dispatch-agent-{agent}"), &labels).await?))
        });
    }
    let mut registered = Vec::with_capacity(arguments.agents);
    while let Some(joined) = registering.join_next().await {
        registered.push(joined??);
    }
    let register_seconds = started.elapsed().as_secs_f64();

    let (event_sender, events) = mpsc::unbounded_channel();
    collect(events, observed);
    let started = Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    let on_offer = OnOffer::FinishAtOnce { steps: arguments.steps };
    for (agent, identity) in registered {
        let channel = channels[agent / arguments.agents_per_connection].clone();
        let (spec, limit, event_sender) = (spec.clone(), limit.clone(), event_sender.clone());
        opening.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            sim_agent::open_session(&channel, identity, agent, &spec, on_offer, event_sender).await
        });
    }
    let mut sessions = Vec::with_capacity(arguments.agents);
    while let Some(joined) = opening.join_next().await {
        sessions.push(joined??);
    }
    sim_agent::wait_for_online_agents(node, arguments.agents).await?;
    let sessions_seconds = started.elapsed().as_secs_f64();

    // The cost of holding the sessions: heartbeats, reports, the scheduler's rounds.
    let cpu_before = node.process.cpu_seconds();
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle_server_cpu_percent = 100.0 * (node.process.cpu_seconds() - cpu_before) / idle_started.elapsed().as_secs_f64();
    let setup =
        Setup { register_seconds, sessions_seconds, idle_server_cpu_percent, idle_server_rss: node.process.rss_bytes(), connections };
    Ok((sessions, setup))
}

async fn create_pipelines(arguments: &Arguments, node: &DavitNode) -> anyhow::Result<Vec<u64>> {
    let mut pipelines = Vec::with_capacity(arguments.pipelines);
    for index in 0..arguments.pipelines {
        let repo = node
            .post(
                "/api/v1/repos/connect",
                &serde_json::json!({"repo_url": format!("https://github.com/davit-bench/app-{index}"), "branch": "main", "scm_type": "github"}),
            )
            .await?;
        let pipeline = node
            .post(
                "/api/v1/pipelines",
                &serde_json::json!({"name": format!("app-{index}"), "repo_id": repo["repo_id"], "branch": "main",
                    "build_command": "make", "deploy_strategy": "rolling", "build": {"test_command": "make test"}}),
            )
            .await?;
        pipelines.push(pipeline["pipeline_id"].as_u64().context("the pipeline answer has no pipeline_id")?);
    }
    Ok(pipelines)
}

/// The load generator's shared state for one phase.
struct Generator {
    node_url: String,
    token: String,
    http: reqwest::Client,
    pipelines: Vec<u64>,
    commit_counter: Arc<AtomicU64>,
    created: Mutex<Vec<Created>>,
    failures: AtomicU64,
    first_failure: Mutex<Option<String>>,
    in_flight: AtomicUsize,
}

impl Generator {
    /// Create one deployment (one build job); `sent` is when it was due.
    async fn create(&self, sent: Instant) {
        let number = self.commit_counter.fetch_add(1, Ordering::Relaxed);
        let pipeline_id = self.pipelines[number as usize % self.pipelines.len()];
        let body = serde_json::json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": format!("{:040x}", number + 1), "environment": "development"});
        let response = self.http.post(format!("{}/api/v1/deployments", self.node_url)).bearer_auth(&self.token).json(&body).send().await;
        let answer = match response {
            Ok(response) if response.status().is_success() => response.json::<serde_json::Value>().await.map_err(|e| e.to_string()),
            Ok(response) => Err(format!("{}: {}", response.status(), response.text().await.unwrap_or_default())),
            Err(error) => Err(error.to_string()),
        };
        let answered = Instant::now();
        match answer.and_then(|value| value["deployment_id"].as_u64().ok_or_else(|| format!("no deployment_id in {value}"))) {
            Ok(deployment_id) => self.created.lock().expect("created lock").push(Created { deployment_id, sent, answered }),
            Err(error) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.first_failure.lock().expect("failure lock").get_or_insert(error);
            }
        }
    }
}

async fn run_phase(
    arguments: &Arguments,
    node: &DavitNode,
    load: Load,
    pipelines: &[u64],
    commit_counter: &Arc<AtomicU64>,
    observed: &Arc<Mutex<Observed>>,
) -> anyhow::Result<PhaseResult> {
    let generator = Arc::new(Generator {
        node_url: node.url(""),
        token: node.token.clone(),
        http: node.http.clone(),
        pipelines: pipelines.to_vec(),
        commit_counter: commit_counter.clone(),
        created: Mutex::new(Vec::new()),
        failures: AtomicU64::new(0),
        first_failure: Mutex::new(None),
        in_flight: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let window_start = started + Duration::from_secs(arguments.warmup_seconds);
    let window_end = window_start + Duration::from_secs(arguments.duration_seconds.max(1));
    let skipped = Arc::new(AtomicU64::new(0));

    let driver = {
        let (generator, skipped) = (generator.clone(), skipped.clone());
        let (max_jobs, max_in_flight) = (arguments.max_jobs_per_phase, arguments.max_in_flight);
        tokio::spawn(async move {
            let mut requests = tokio::task::JoinSet::new();
            match load {
                Load::Open { jobs_per_second } => {
                    let interval = Duration::from_secs_f64(1.0 / jobs_per_second);
                    for index in 0..max_jobs {
                        let due = started + interval.mul_f64(index as f64);
                        if due >= window_end {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        if generator.in_flight.load(Ordering::Relaxed) >= max_in_flight {
                            skipped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        generator.in_flight.fetch_add(1, Ordering::Relaxed);
                        let generator = generator.clone();
                        requests.spawn(async move {
                            generator.create(due).await;
                            generator.in_flight.fetch_sub(1, Ordering::Relaxed);
                        });
                        while requests.try_join_next().is_some() {}
                    }
                }
                Load::Closed { clients } => {
                    let issued = Arc::new(AtomicU64::new(0));
                    for _ in 0..clients {
                        let (generator, issued) = (generator.clone(), issued.clone());
                        requests.spawn(async move {
                            while Instant::now() < window_end && issued.fetch_add(1, Ordering::Relaxed) < max_jobs {
                                generator.create(Instant::now()).await;
                            }
                        });
                    }
                }
            }
            while requests.join_next().await.is_some() {}
        })
    };

    tokio::time::sleep_until(window_start.into()).await;
    let server_cpu_before = node.process.cpu_seconds();
    let self_cpu_before = process_cpu_seconds("self");
    let metrics_before = node.metrics().await.unwrap_or_default();
    let measuring = Instant::now();
    tokio::time::sleep_until(window_end.into()).await;
    let window_seconds = measuring.elapsed().as_secs_f64();
    let server_cpu = node.process.cpu_seconds() - server_cpu_before;
    let self_cpu = process_cpu_seconds("self") - self_cpu_before;
    let metrics_after = node.metrics().await.unwrap_or_default();
    driver.await.context("the load generator panicked")?;

    // Every job created in the phase should be offered and finished; wait for the stragglers.
    let created = std::mem::take(&mut *generator.created.lock().expect("created lock"));
    let settle_deadline = Instant::now() + Duration::from_secs(arguments.settle_seconds);
    loop {
        let pending = {
            let observed = observed.lock().expect("observed lock");
            created.iter().filter(|job| !observed.finished.contains_key(&job.deployment_id)).count()
        };
        if pending == 0 || Instant::now() > settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut observed = observed.lock().expect("observed lock");
    observed.closed_sessions_before_end = observed.closed_sessions;
    let in_window = |at: Instant| at >= window_start && at <= window_end;
    let mut result = PhaseResult {
        load,
        window_seconds,
        counted: 0,
        answered_in_window: created.iter().filter(|job| in_window(job.answered)).count(),
        offered_in_window: created.iter().filter(|job| observed.offered.get(&job.deployment_id).is_some_and(|at| in_window(*at))).count(),
        answer_to_offer: Vec::new(),
        offers_before_answer: 0,
        request_to_offer: Vec::new(),
        request_to_finish: Vec::new(),
        api_latency: Vec::new(),
        not_offered: 0,
        not_finished: 0,
        failed_requests: generator.failures.load(Ordering::Relaxed),
        first_failure: generator.first_failure.lock().expect("failure lock").clone(),
        skipped: skipped.load(Ordering::Relaxed),
        server_cpu_percent: 100.0 * server_cpu / window_seconds,
        load_generator_cpu_percent: 100.0 * self_cpu / window_seconds,
        scheduler: SchedulerDeltas::between(&metrics_before, &metrics_after, window_seconds),
    };
    for job in &created {
        let offered = observed.offered.get(&job.deployment_id).copied();
        let finished = observed.finished.get(&job.deployment_id).copied();
        result.not_offered += usize::from(offered.is_none());
        result.not_finished += usize::from(finished.is_none());
        if !in_window(job.sent) {
            continue;
        }
        result.counted += 1;
        result.api_latency.push(job.answered - job.sent);
        if let Some(offered) = offered {
            result.answer_to_offer.push(offered.saturating_duration_since(job.answered));
            result.offers_before_answer += usize::from(offered < job.answered);
            result.request_to_offer.push(offered.saturating_duration_since(job.sent));
        }
        if let Some(finished) = finished {
            result.request_to_finish.push(finished.saturating_duration_since(job.sent));
        }
    }
    for latencies in [&mut result.answer_to_offer, &mut result.request_to_offer, &mut result.request_to_finish, &mut result.api_latency] {
        latencies.sort_unstable();
    }
    Ok(result)
}

impl SchedulerDeltas {
    fn between(
        before: &std::collections::BTreeMap<String, f64>,
        after: &std::collections::BTreeMap<String, f64>,
        seconds: f64,
    ) -> SchedulerDeltas {
        let delta = |name: &str| after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0);
        let ratio = |numerator: f64, denominator: f64| if denominator > 0.0 { numerator / denominator } else { 0.0 };
        SchedulerDeltas {
            rounds_with_assignments: delta("davit_scheduler_dispatch_seconds_count") / seconds,
            assignments: delta("davit_scheduler_assignments_total") / seconds,
            round_mean_seconds: ratio(delta("davit_scheduler_dispatch_seconds_sum"), delta("davit_scheduler_dispatch_seconds_count")),
            proposals_per_second: delta("davit_proposal_seconds_count") / seconds,
            proposal_mean_seconds: ratio(delta("davit_proposal_seconds_sum"), delta("davit_proposal_seconds_count")),
            fsyncs_per_second: delta("davit_raft_log_flush_batch_count") / seconds,
        }
    }
}

impl PhaseResult {
    fn dispatched_per_second(&self) -> f64 {
        self.offered_in_window as f64 / self.window_seconds
    }

    fn summary(&self) -> String {
        let mut line = format!(
            "{} jobs counted, created {:.0}/s, dispatched {:.0}/s, answer->offer p50 {} p99 {} max {} ms, request->offer p99 {} ms, \
             request->finished p99 {} ms, server CPU {:.0}%, load generator CPU {:.0}%, {} not offered, {} not finished, {} failed, {} skipped",
            self.counted,
            self.answered_in_window as f64 / self.window_seconds,
            self.dispatched_per_second(),
            milliseconds(percentile(&self.answer_to_offer, 0.50)),
            milliseconds(percentile(&self.answer_to_offer, 0.99)),
            milliseconds(self.answer_to_offer.last().copied().unwrap_or_default()),
            milliseconds(percentile(&self.request_to_offer, 0.99)),
            milliseconds(percentile(&self.request_to_finish, 0.99)),
            self.server_cpu_percent,
            self.load_generator_cpu_percent,
            self.not_offered,
            self.not_finished,
            self.failed_requests,
            self.skipped
        );
        if let Some(failure) = &self.first_failure {
            let _ = write!(line, " (first failure: {failure})");
        }
        line
    }
}

struct Report<'a> {
    arguments: &'a Arguments,
    machine: &'a Machine,
    setup: &'a Setup,
    results: &'a [PhaseResult],
    anomalies: &'a Anomalies,
}

fn triple(latencies: &[Duration]) -> String {
    format!(
        "{} / {} / {}",
        milliseconds(percentile(latencies, 0.50)),
        milliseconds(percentile(latencies, 0.99)),
        milliseconds(latencies.last().copied().unwrap_or_default())
    )
}

impl Report<'_> {
    fn render(&self) -> String {
        let (arguments, setup) = (self.arguments, self.setup);
        let mut out = String::new();
        let _ = writeln!(out, "### Run of {}\n", self.machine.date);
        out.push_str(&self.machine.render());
        let _ = writeln!(
            out,
            "- Davit: `{}`, workspace at git `{}` (`-dirty`: uncommitted changes), release build, one node (`davit serve`, redb)",
            arguments.davit_binary.display(),
            davit_source()
        );
        let _ = writeln!(
            out,
            "- Agents: {} simulated agents speaking the real agent protocol (registration, one `Session` stream each, heartbeats every 2 s), \
             {} per HTTP/2 connection ({} connections), capacity {} each, labels `pool=build`, executor `shell`. Each accepts an offer at once{} \
             and reports the job succeeded at once. Registering them took {:.1} s, opening their sessions {:.1} s; holding the idle sessions \
             cost the server {:.0}% of a core, and its RSS was {}.",
            arguments.agents,
            arguments.agents_per_connection,
            setup.connections,
            arguments.capacity,
            if arguments.steps > 0 { format!(", reports {} step(s)", arguments.steps) } else { String::new() },
            setup.register_seconds,
            setup.sessions_seconds,
            setup.idle_server_cpu_percent,
            setup.idle_server_rss.map_or("-".to_string(), |bytes| format!("{:.0} MB", bytes as f64 / 1e6))
        );
        let _ = writeln!(
            out,
            "- Jobs: `POST /api/v1/deployments` of {} pipelines in turn (each deployment queues one build job); phases of {} s warm-up \
             and {} s measured; a job counts when its request was due inside the window. The process is on the same {} cores as the load generator.",
            arguments.pipelines, arguments.warmup_seconds, arguments.duration_seconds, self.machine.cpus
        );
        let _ = writeln!(
            out,
            "- Dispatched/s: offers that reached their agent inside the window, per second. Dispatch latency: from the API's answer to \
             the offer's arrival at the agent (an offer that arrives before the answer counts as 0 ms: the API answers after storing the \
             deployment's first log line, the scheduler does not wait for it); request → offer also counts the API's own write. \
             Request → finished: until the agent got its result acknowledged (3 more Raft writes: assignment, acceptance, result)."
        );
        let _ = writeln!(out, "- Reproduce:\n\n```sh\n{}\n```\n", reproduce_command());

        let _ = writeln!(out, "#### Jobs per second and latency (p50 / p99 / max, ms)\n");
        let _ = writeln!(
            out,
            "| load | jobs counted | created/s | dispatched/s | answer → offer | offers before answer | request → offer | request → finished | API answer | server CPU | load generator CPU |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for result in self.results {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {} | {:.0}% | {} | {} | {} | {:.0}% | {:.0}% |",
                result.load,
                result.counted,
                result.answered_in_window as f64 / result.window_seconds,
                result.dispatched_per_second(),
                triple(&result.answer_to_offer),
                100.0 * result.offers_before_answer as f64 / result.answer_to_offer.len().max(1) as f64,
                triple(&result.request_to_offer),
                triple(&result.request_to_finish),
                triple(&result.api_latency),
                result.server_cpu_percent,
                result.load_generator_cpu_percent
            );
        }
        out.push('\n');
        let problems: Vec<String> = self
            .results
            .iter()
            .filter(|result| result.not_offered + result.not_finished > 0 || result.failed_requests + result.skipped > 0)
            .map(|result| format!("- {}: {}", result.load, result.summary()))
            .collect();
        if problems.is_empty() {
            let _ = writeln!(out, "Every job created was offered and finished within the settling time after its phase.\n");
        } else {
            let _ = writeln!(out, "Jobs not offered or not finished, failed or skipped requests:\n\n{}\n", problems.join("\n"));
        }
        let anomalies = self.anomalies;
        let _ = writeln!(
            out,
            "Offers went to {} of the {} agents: the scheduler gives a job to the matching agent with the most free slots, the lowest id \
             among equals, and these agents are free again at once. Every agent's session is a candidate in every scheduling round.\n",
            anomalies.agents_offered, arguments.agents
        );
        let _ = writeln!(
            out,
            "Over the whole run: {} offers of a job already offered, {} results refused{}, {} cancellations, {} sessions closed by the coordinator{}.\n",
            anomalies.duplicate_offers,
            anomalies.refused_results,
            anomalies.first_refusal.as_ref().map_or(String::new(), |refusal| format!(" (first: {refusal})")),
            anomalies.cancellations,
            anomalies.closed_sessions,
            anomalies
                .first_closure
                .as_ref()
                .filter(|_| anomalies.closed_sessions > 0)
                .map_or(String::new(), |closure| format!(" (first: {closure})"))
        );

        let _ = writeln!(out, "#### The coordinator during each window (from `/metrics`)\n");
        let _ = writeln!(
            out,
            "| load | scheduler rounds that assigned/s | assignments/s | mean round ms | Raft proposals/s | mean proposal ms | log fsyncs/s |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for result in self.results {
            let scheduler = &result.scheduler;
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} | {:.0} |",
                result.load,
                scheduler.rounds_with_assignments,
                scheduler.assignments,
                scheduler.round_mean_seconds * 1000.0,
                scheduler.proposals_per_second,
                scheduler.proposal_mean_seconds * 1000.0,
                scheduler.fsyncs_per_second
            );
        }
        out.push('\n');
        let _ = writeln!(out, "{}", self.target_verdict());
        out
    }

    fn target_verdict(&self) -> String {
        let mut out = format!(
            "**Target:** with {TARGET_AGENTS} agents, at least {TARGET_JOBS_PER_SECOND:.0} jobs/s dispatched with p99 dispatch latency under {} ms.",
            TARGET_P99.as_millis()
        );
        if self.arguments.agents < TARGET_AGENTS {
            out.push_str(" Not measured in this run (fewer agents).");
            return out;
        }
        let at_target: Vec<&PhaseResult> = self
            .results
            .iter()
            .filter(|result| matches!(result.load, Load::Open { jobs_per_second } if jobs_per_second >= TARGET_JOBS_PER_SECOND))
            .collect();
        if at_target.is_empty() {
            out.push_str(" Not measured in this run (no open-loop phase at the target rate).");
            return out;
        }
        for result in at_target {
            let p99 = percentile(&result.answer_to_offer, 0.99);
            let complete = result.not_offered == 0 && result.failed_requests == 0 && result.skipped == 0;
            // An open loop at the target rate dispatches at most that rate; a window's edges
            // may cut a few offers, hence 98%.
            let met = result.dispatched_per_second() >= TARGET_JOBS_PER_SECOND * 0.98 && p99 < TARGET_P99 && complete;
            let _ = write!(
                out,
                "\n- {}: {:.0} jobs/s dispatched (kept up: at least 98% of the rate), p99 answer → offer {} ms (request → offer {} ms){}: **{}**.",
                result.load,
                result.dispatched_per_second(),
                milliseconds(p99),
                milliseconds(percentile(&result.request_to_offer, 0.99)),
                if complete { "" } else { ", some jobs failed, were skipped or never offered" },
                if met { "met" } else { "not met" }
            );
        }
        out
    }
}

fn reproduce_command() -> String {
    format!(
        "export CARGO_TARGET_DIR=/var/cache/davit-target\n\
         cargo build --release -p davit-coordinator -p davit-benches\n\
         $CARGO_TARGET_DIR/release/dispatch {}",
        quoted_arguments()
    )
}
